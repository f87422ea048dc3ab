"""`gpt2repro chat`: talk to a chat model in the terminal.

Replies stream to stdout as they are sampled; everything else (the banner, notices when old turns
are dropped, the timings at the end) goes to stderr, so `--message TEXT` prints the reply alone.
`/reset` starts the conversation again (the system message stays), `/exit` or end of input leaves;
Ctrl-C stops a reply early (what was shown is kept), or cancels the turn before its reply began. The conversation lives in the KV cache (`chat_session.ChatSession`).
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable

from ..model.gpt import GPT
from ..text import chat
from ..text.chat import ChatError
from ..text.tokentext import TextStream
from .chat_session import ChatSession, require_chat_model
from .generate import GenerateError

COMMANDS = "/reset starts over, /exit leaves"


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def stream_reply(session: ChatSession, text: str, write: Callable[[str], None]) -> None:
    """Send `text` and write the reply as it comes, whole characters at a time."""
    stream = TextStream(chat.encoding().decode_single_token_bytes)  # as the server streams text
    reply, turns = session.send(text), len(session.turns)
    try:
        for token in reply:
            write(stream.feed(token))
        write(stream.finish())
    except KeyboardInterrupt:  # the reply stops here (kept), or the turn never happened
        reply.close()
        _say("\n[reply stopped]" if len(session.turns) > turns else "\n[turn cancelled]")


def timings(session: ChatSession) -> str:
    """First-token latency and decoding speed over the replies of a session."""
    turns = session.turns
    if not turns:
        return "no replies"
    first = statistics.mean(t["first_token_s"] for t in turns) * 1000
    tokens = sum(t["reply_tokens"] for t in turns)
    decode, steps = sum(t["decode_s"] for t in turns), sum(t["decode_steps"] for t in turns)
    speed = f"{steps / decode:.1f} tokens/s decoding" if steps and decode > 0 else "no decoding"
    return f"{len(turns)} replies, {tokens} tokens: first token after {first:.0f} ms on average, {speed}"


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def run(model: GPT, message: str | None, system: str | None, **sampling) -> None:
    """Answer `message` once, or hold a conversation read from stdin until /exit or end of input."""
    require_chat_model(model, "the model")
    session = ChatSession(model, system=system, on_notice=_say, **sampling)
    if session.step.compiled is not None:
        _say("[compiling the decoding step: once per process, tens of seconds]")
        session.step.warm(1)
    if message is not None:
        stream_reply(session, message, _write)
        _write("\n")
        _say(f"[{timings(session)}]")
        return
    if sys.stdin.isatty():
        import readline  # noqa: F401 - line editing and history for input()
    _say(f"[chat with a {model.num_params():,}-parameter model, {session.context}-token context; {COMMANDS}]")
    try:
        _converse(session)
    finally:
        _say(f"[{timings(session)}]")


def _converse(session: ChatSession) -> None:
    while True:
        try:
            text = input("you> ")
        except (EOFError, KeyboardInterrupt):
            _say("")
            return
        command = text.strip()
        if command == "/exit":
            return
        if command == "/reset":
            session.reset()
            _say("[conversation reset]")
            continue
        if not command:
            continue
        _write("assistant> ")
        try:
            stream_reply(session, text, _write)
        except (GenerateError, ChatError) as e:  # too long, or a special token typed: say so, go on
            _say(f"[{e}]")
        _write("\n")
