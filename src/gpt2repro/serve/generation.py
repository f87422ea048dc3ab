"""One request's generation on the asyncio side: a job per choice (prompt x n) submitted to the
engine, the engine's events brought onto the event loop, each choice's text and log-probabilities
kept, and the OpenAI response bodies and stream chunks built from them. Leaving `events` early (a
client gone, a stop string) cancels every job, which frees its slot."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from .engine import Engine, Job, TokenInfo
from .protocol import APIError, Params
from .text import TextStream, logprobs_object


@dataclass
class Served:
    """The model as the app sees it: its engine, name, tokenizer and (chat models) chat format."""

    engine: Engine
    model_id: str
    vocab_size: int
    block_size: int
    encode: Callable[[str], list[int]]
    token_bytes: Callable[[int], bytes]
    chat: object | None = None  # run.ChatFormat for chat models

    def token_str(self, token: int) -> str:
        return self.token_bytes(token).decode("utf-8", errors="replace")

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in ids).decode("utf-8", errors="replace")


@dataclass
class Choice:
    job: Job
    stream: TextStream
    prompt_infos: list[TokenInfo] = field(default_factory=list)
    infos: list[TokenInfo] = field(default_factory=list)
    text: str = ""
    tokens: int = 0
    finish: str | None = None


class Generation:
    def __init__(self, served: Served, params: Params, stop_ids: frozenset[int] = frozenset()):
        self.served, self.params, self.stop_ids = served, params, stop_ids
        self.created = int(time.time())
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.choices = []
        for ids in params.prompts:
            for _ in range(params.n):
                i = len(self.choices)

                def emit(event, i=i):
                    loop.call_soon_threadsafe(self.queue.put_nowait, (i, event))

                echo_logprobs = params.echo and params.logprobs is not None
                job = Job(ids, params.max_tokens, emit, params.temperature, params.top_p, (seed + i) % 2**64,
                          stop_ids, params.logprobs, echo_logprobs)  # fmt: skip
                self.choices.append(Choice(job, TextStream(served.token_bytes, params.stop)))

    async def events(self) -> AsyncIterator[tuple[int, str, list[TokenInfo], bool]]:
        """(choice, new text, new tokens' infos, whether it is the choice's last) as they come."""
        for choice in self.choices:
            self.served.engine.submit(choice.job)
        left = len(self.choices)
        try:
            while left:
                i, (kind, payload) = await self.queue.get()
                choice = self.choices[i]
                if kind == "error":
                    status = 503 if "shutting down" in payload else 500
                    raise APIError(status, payload, code="server_error")
                if kind == "prompt":
                    choice.prompt_infos = payload
                elif kind == "token" and not choice.finish:
                    yield i, self._token(choice, payload), [payload], False
                elif kind == "done":
                    left -= 1
                    choice.finish = choice.finish or payload
                    tail = choice.stream.finish()
                    choice.text += tail
                    yield i, tail, [], True
        finally:
            for choice in self.choices:
                choice.job.cancelled = True

    def _token(self, choice: Choice, info: TokenInfo) -> str:
        choice.tokens += 1
        if info.id in self.stop_ids:
            choice.finish = "stop"
            return ""
        choice.infos.append(info)
        delta = choice.stream.feed(info.id)
        choice.text += delta
        if choice.stream.stopped:
            choice.job.cancelled, choice.finish = True, "stop"
        return delta

    async def run(self) -> None:
        async for _ in self.events():
            pass

    async def completion_chunks(self) -> AsyncIterator[dict]:
        """The stream of a completion: each choice's text as it comes (the prompt first with echo),
        its finish_reason in its last chunk, then the usage when asked for."""
        offsets, echoed = [0] * len(self.choices), set()
        async for i, text, infos, last in self.events():
            c = self.choices[i]
            if self.params.echo and i not in echoed:
                echoed.add(i)
                text, infos = self.prompt_text(c) + text, c.prompt_infos + infos
            logprobs = self.logprobs(infos, offsets[i])
            offsets[i] += sum(len(self.served.token_str(t.id)) for t in infos)
            if text or infos or last:
                choice = {
                    "text": text,
                    "index": i,
                    "logprobs": logprobs,
                    "finish_reason": c.finish if last else None,
                }
                yield {**self.head("text_completion"), "choices": [choice]}
        if self.params.include_usage:
            yield {**self.head("text_completion"), "choices": [], "usage": self.usage()}

    async def chat_chunks(self) -> AsyncIterator[dict]:
        """The stream of a chat completion: the role first, then the reply's text, then the finish."""
        started = set()
        async for i, text, _, last in self.events():
            delta = {"role": "assistant", "content": ""} if i not in started else {}
            started.add(i)
            delta.update({"content": text} if text else {})
            if delta or last:
                choice = {
                    "index": i,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": self.choices[i].finish if last else None,
                }
                yield {**self.head("chat.completion.chunk"), "choices": [choice]}
        if self.params.include_usage:
            yield {**self.head("chat.completion.chunk"), "choices": [], "usage": self.usage()}

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.params.prompts)
        completion = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def head(self, kind: str) -> dict:
        prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
        return {"id": f"{prefix}-{id(self):x}{self.created:x}", "object": kind, "created": self.created,
                "model": self.served.model_id}  # fmt: skip

    def logprobs(self, infos: list[TokenInfo], offset: int) -> dict | None:
        if self.params.logprobs is None:
            return None
        return logprobs_object(infos, self.served.token_str, offset)

    def prompt_text(self, choice: Choice) -> str:
        return self.served.decode(choice.job.prompt) if self.params.echo else ""

    def completion(self) -> dict:
        out = []
        for i, c in enumerate(self.choices):
            echo = self.prompt_text(c)
            infos = (c.prompt_infos if self.params.echo else []) + c.infos
            out.append({"text": echo + c.text, "index": i, "logprobs": self.logprobs(infos, 0),
                        "finish_reason": c.finish})  # fmt: skip
        return {**self.head("text_completion"), "choices": out, "usage": self.usage()}

    def chat_completion(self) -> dict:
        out = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": None,
                "finish_reason": c.finish,
            }  # fmt: skip
            for i, c in enumerate(self.choices)
        ]
        return {**self.head("chat.completion"), "choices": out, "usage": self.usage()}
