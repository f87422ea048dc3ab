"""One request's generation on the asyncio side: a job per choice (prompt x n) submitted to the
engine, the engine's events brought onto the event loop, each choice's text and log-probabilities
kept (`tokentext`: whole characters, offsets, stop strings), and the OpenAI response bodies and
stream chunks built from them. Leaving `events` early (a client gone, a stop string) cancels every
job, which frees its slot."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from ..generation.sampling import Sampling, ends_reply
from ..text.tokentext import Piece, TextStream, logprobs_object, pieces_of
from .engine import Engine, Job, TokenInfo
from .protocol import APIError, Params


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

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in ids).decode("utf-8", errors="replace")


@dataclass
class Choice:
    job: Job
    stream: TextStream
    prompt_infos: list[TokenInfo] = field(default_factory=list)
    text: str = ""
    tokens: int = 0
    finish: str | None = None
    last_token: float | None = None  # when its latest token came (time.perf_counter)
    echo: list[Piece] | None = None  # the prompt's pieces, once built


class Generation:
    def __init__(self, served: Served, params: Params, metrics=None):
        self.served, self.params, self.metrics = served, params, metrics
        self.created, self.started = int(time.time()), time.perf_counter()
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.choices = []
        for ids in params.prompts:
            for _ in range(params.n):
                i = len(self.choices)

                def emit(event, i=i):
                    loop.call_soon_threadsafe(self.queue.put_nowait, (i, event))

                sampling = Sampling(params.temperature, params.top_k, params.top_p, (seed + i) % 2**64,
                                    params.logit_bias, params.presence_penalty, params.frequency_penalty)  # fmt: skip
                job = Job(ids, params.max_tokens, emit, sampling, self, params.logprobs,
                          params.echo and params.logprobs is not None)  # fmt: skip
                self.choices.append(Choice(job, TextStream(served.token_bytes, params.stop)))

    async def events(self) -> AsyncIterator[tuple[int, str, list[Piece], bool]]:
        """(choice, new text, the tokens released with it, whether it is the choice's last)."""
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
                elif kind == "start" and self.metrics is not None:
                    self.metrics.cached(payload)
                elif kind == "token" and not choice.finish:
                    delta = self._token(choice, payload)
                    yield i, delta, choice.stream.released(), False
                elif kind == "done":
                    left -= 1
                    choice.finish = choice.finish or payload
                    tail = choice.stream.finish()
                    choice.text += tail
                    yield i, tail, choice.stream.released(), True
        finally:
            for choice in self.choices:
                choice.job.cancelled = True
            if self.metrics is not None:
                # per sequence, the work done: as the cached tokens are counted (each job's "start")
                self.metrics.tokens(
                    sum(len(c.job.prompt) for c in self.choices), sum(c.tokens for c in self.choices)
                )

    def _token(self, choice: Choice, info: TokenInfo) -> str:
        now = time.perf_counter()
        if self.metrics is not None:
            self.metrics.token(now - (choice.last_token or self.started), first=choice.last_token is None)
        choice.tokens, choice.last_token = choice.tokens + 1, now
        if ends_reply(info.id):
            choice.finish = "stop"
            return ""
        delta = choice.stream.feed(info.id, info)
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
        echoed = set()
        async for i, text, pieces, last in self.events():
            c = self.choices[i]
            shift = 0
            if self.params.echo:
                prompt = self.prompt_pieces(c)
                shift = sum(len(p.text) for p in prompt)
                if i not in echoed:
                    echoed.add(i)
                    text, pieces = (
                        "".join(p.text for p in prompt) + text,
                        prompt + self._shifted(pieces, shift),
                    )
                else:
                    pieces = self._shifted(pieces, shift)
            if text or pieces or last:
                choice = {"text": text, "index": i, "logprobs": self.logprobs(pieces),
                          "finish_reason": c.finish if last else None}  # fmt: skip
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

    def logprobs(self, pieces: list[Piece]) -> dict | None:
        if self.params.logprobs is None:
            return None
        return logprobs_object(pieces, self.served.token_bytes)

    def prompt_pieces(self, choice: Choice) -> list[Piece]:
        """The echoed prompt's tokens: their text, offsets and (with logprobs) the engine's infos (which
        come before the choice's first token)."""
        if choice.echo is None:
            choice.echo = pieces_of(choice.job.prompt, self.served.token_bytes)
            infos = choice.prompt_infos or [TokenInfo(t) for t in choice.job.prompt]
            for p, info in zip(choice.echo, infos):
                p.payload = info
        return choice.echo

    @staticmethod
    def _shifted(pieces: list[Piece], by: int) -> list[Piece]:
        return [Piece(p.payload, p.offset + by, p.text) for p in pieces]

    def completion(self) -> dict:
        out = []
        for i, c in enumerate(self.choices):
            prompt = self.prompt_pieces(c) if self.params.echo else []
            echo = "".join(p.text for p in prompt)
            pieces = prompt + self._shifted(c.stream.pieces, len(echo))
            out.append({"text": echo + c.text, "index": i, "logprobs": self.logprobs(pieces),
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
