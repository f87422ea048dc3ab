"""Starting and stopping the server: the model wrapped for the app (its tokenizer, and the chat format
when it is a chat model), uvicorn in the foreground for `gpt2repro serve` (SIGTERM stops accepting,
lets in-flight requests finish for up to GRACE seconds, then fails the rest and exits), or on a thread
for tests and `bench serve`."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..generation.decoding import prepare
from ..model.gpt import GPT
from ..text.tokenizer import get_tokenizer
from .engine import Engine
from .generation import Served
from .protocol import APIError

GRACE = 30  # seconds in-flight requests get to finish after SIGTERM


class ServeError(UserError):
    """The server cannot start (the serve extra missing, the port taken); one line."""


@dataclass
class ChatFormat:
    """What the app needs of a chat template: a conversation's prompt ids, and each token's text."""

    render: Callable[[list[dict]], list[int]]
    token_bytes: Callable[[int], bytes]


def chat_format(config) -> ChatFormat | None:
    """The chat format of a chat model (`chat.py`, issue #23); None for a base model."""
    if not getattr(config, "chat", False):
        return None
    from ..text import chat

    def render(messages: list[dict]) -> list[int]:
        try:  # the replies come back as text: whatever they spell, they are ordinary tokens
            return chat.render(messages, add_generation_prompt=True, replies_as_text=True)
        except chat.ChatError as e:
            raise APIError(400, str(e), "messages") from None

    return ChatFormat(render, chat.encoding().decode_single_token_bytes)


def served_model(
    model: GPT, model_id: str, slots: int, prefix_cache: bool = True, compiled: bool = False
) -> Served:
    """The model behind the API, its engine started. Its fp32 weights are laid out for decoding in
    place (`decoding.prepare`: where measured faster, the same values stored transposed; `.contiguous()`
    them before writing them with anything but this project's writers)."""
    enc = get_tokenizer()
    chat = chat_format(model.config)
    decode_one = chat.token_bytes if chat else enc.decode_single_token_bytes

    def token_bytes(token: int) -> bytes:
        try:
            return decode_one(token)
        except KeyError:  # an id the tokenizer lacks (a padded row): no text
            return b""

    return Served(
        Engine(prepare(model), slots, prefix_cache, compiled).start(), model_id, model.config.vocab_size, model.config.block_size,
        enc.encode_ordinary, token_bytes, chat,
    )  # fmt: skip


def model_name(checkpoint: str | None, hf: str | None) -> str:
    return Path(checkpoint).resolve().name if checkpoint else Path(hf).name


def uvicorn_module():
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ServeError(
            f"serving needs the 'serve' extra ({e.name} is missing): pip install 'gpt2repro[serve]'"
        ) from None
    return uvicorn


def serve(
    served: Served,
    host: str,
    port: int,
    api_key: str | None,
    max_tokens_limit: int | None,
    allowed_hosts: list[str] | None = None,
    cors_origins: list[str] | None = None,
) -> None:
    """Serve until SIGTERM or Ctrl-C."""
    uvicorn = uvicorn_module()
    from .app import create_app
    from .guard import allowed_hosts as hosts_for

    hosts = hosts_for(host, allowed_hosts)
    app = create_app(served, api_key, max_tokens_limit, hosts, frozenset(cors_origins or ()))
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=GRACE, log_level="info")
    server = uvicorn.Server(config)
    # uvicorn stops gracefully on SIGTERM, then raises it again for the handler it found: a no-op one
    # lets the engine stop and the command exit 0
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        served.engine.stop()
    if not server.started:
        raise ServeError(f"could not listen on {host}:{port} (is the port taken?)")


class ServerThread:
    """The app on 127.0.0.1 on a port the system picks, on a thread: `with ServerThread(app) as s:`
    then `s.url`."""

    def __init__(self, app, host: str = "127.0.0.1"):
        uvicorn = uvicorn_module()
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.host = host

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ServeError("the test server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
