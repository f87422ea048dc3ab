"""A conversation with a chat model, held in its KV cache across turns.

`ChatSession.send(text)` yields the reply's tokens as they are sampled. The keys and values of every
token so far stay in the cache, so a new turn runs only its own tokens through the model (the user
turn and the tokens opening the reply), never the history again: `forward_tokens` counts what ran.
When the history and a new turn no longer fit the context (with room left for a reply), the oldest
turns are dropped and the rest is encoded afresh, and `on_notice` says so. A reply ends where
`sampling.ends_reply` says (any token that is not text), at `max_new_tokens`, or when the context is
full; the turn is then closed with its end token either way, so the history stays a well-formed
conversation.

Each message is kept as the token ids it was given to the model: the model's replies as it sampled
them, never re-encoded from their text, so only what the user types is checked (a reply that spells
`<|endoftext|>` out of ordinary tokens is just text). A turn is all or nothing: interrupted (Ctrl-C)
before its reply's first token, it leaves the conversation as it was; interrupted later, the reply
so far is kept and closed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

from ..model.gpt import GPT
from ..model.kvcache import KVCache
from ..text import chat
from ..text.tokenizer import EOT_ID, get_tokenizer
from .decoding import Decoder
from .sampling import GREEDY, GenerateError, Sampling, draw, ends_reply


def require_chat_model(model: GPT, what: str = "this model") -> None:
    if not model.config.chat:
        raise GenerateError(
            f"{what} is a base model without chat tokens (model.chat=false): fine-tune it with the sft "
            "preset first, or continue text with `gpt2repro sample`"
        )


def _opened(message: dict) -> list[int]:
    """A message's tokens (start, text, end), then the tokens opening the assistant's reply."""
    return chat.render([message], add_generation_prompt=True)[1:]  # without the leading <|endoftext|>


class ChatSession:
    """One conversation: its messages and their tokens, the tokens in the cache, sampling settings."""

    def __init__(
        self,
        model: GPT,
        system: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int | None = 50,
        seed: int = 42,
        reuse_cache: bool = True,
        on_notice: Callable[[str], None] = lambda message: None,
        top_p: float = 1.0,
        compiled: bool = False,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: dict[int, float] | None = None,
    ):
        require_chat_model(model)
        if max_new_tokens < 1:
            raise GenerateError(f"sampling needs max_new_tokens >= 1 (got {max_new_tokens})")
        penalties = dict(presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
        self.sampling = Sampling.make(
            logit_bias, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, **penalties
        ).check(model.config.vocab_size)
        self.model, self.system, self.on_notice = model, system, on_notice  # no dropout: any mode
        self.max_new_tokens = max_new_tokens
        self.reuse_cache = reuse_cache  # False re-encodes the whole history every turn (a benchmark)
        self.device = next(model.parameters()).device
        self.generator = self.sampling.generator(self.device)
        self.cache = KVCache.empty(model.config, 1, self.device, model.transformer.wte.weight.dtype)
        self.step = Decoder(model, compiled)  # compiled: at its first step (`Decoder`)
        self.forward_tokens = 0
        self.turns: list[dict] = []  # per reply: prompt tokens run, first-token latency, decode time
        self.reset()

    @property
    def context(self) -> int:
        return self.model.config.block_size

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        if self.messages:
            chat.check(self.messages)
        self.spans = [chat.render(self.messages)[1:]] if self.messages else []  # each message's tokens
        self.ids: list[int] = []  # every token given to the model, in order
        self.cached = 0  # how many of them the cache holds

    def _history(self, spans: list[list[int]]) -> list[int]:
        return [EOT_ID, *(t for span in spans for t in span)]

    def _fit(self, text: str) -> list[int]:
        """The new turn's tokens, after dropping the oldest turns if the context needs the room
        (the system message stays). A message too long even alone changes nothing."""
        message = {"role": "user", "content": text}
        chat.check([message])  # what the user typed; the history is the model's own tokens
        new = _opened(message)
        reserve = min(self.max_new_tokens, self.context // 2)
        first = int(self.system is not None)
        messages, spans, cached = self.messages, self.spans, self.cached
        ids = self.ids or self._history(spans)
        dropped = 0
        while len(ids) + len(new) + reserve > self.context and len(messages) > first:
            roles = [m["role"] for m in messages[first:]]
            cut = first + next((i for i in range(1, len(roles)) if roles[i] == "user"), len(roles))
            messages, spans = messages[:first] + messages[cut:], spans[:first] + spans[cut:]
            ids, cached, dropped = self._history(spans), 0, dropped + 1
        needed = len(ids) + len(new)
        if needed >= self.context:
            raise GenerateError(
                f"the message needs {needed} tokens with the conversation; this model's context is {self.context}"
            )
        self.messages, self.spans, self.ids, self.cached = messages, spans, ids, cached
        if dropped:
            self.on_notice(
                f"[the conversation outgrew the {self.context}-token context: dropped its {dropped} oldest "
                f"turn(s), kept {len(messages)} message(s)]"
            )
        return new

    @torch.no_grad()
    def _run(self) -> torch.Tensor:
        """Run the tokens the cache lacks through the model; the logits after the last one."""
        todo = self.ids[self.cached :]
        idx = torch.tensor([todo], dtype=torch.long, device=self.device)
        self.cache.lengths[0] = self.cached  # 0 after dropped turns or a reset: encoded afresh
        if len(todo) == 1 and self.cached:
            logits = self.step(idx, self.cache)
        else:
            logits = self.model.logits(self.model.hidden(idx, self.cache)[:, -1])
        self.cached += len(todo)
        self.forward_tokens += len(todo)
        return logits

    def send(self, text: str) -> Iterator[int]:
        """The user says `text`: yields the reply's token ids as they are sampled (not the token that
        ends it). Interrupted before the first one, the conversation is left as it was."""
        started = time.perf_counter()
        before = (self.messages, self.spans, list(self.ids), self.cached)
        start = self.cached  # the cache is rewritten from here on: any layer may hold new keys past it
        try:
            new = self._fit(text)
            self.ids += new
            self.cached = min(self.cached, len(self.ids)) if self.reuse_cache else 0
            turn = dict(
                prompt_tokens=len(self.ids) - self.cached, reply_tokens=0, decode_steps=0, stopped=False
            )
            start = self.cached
            logits = self._run()
        except BaseException:  # Ctrl-C while the prompt ran (or too long a message): nothing changed
            self.messages, self.spans, self.ids, cached = before
            self.cached = min(cached, start, len(self.ids))  # positions past `start` are recomputed
            raise
        self.messages = [*self.messages, {"role": "user", "content": text}]
        self.spans = [*self.spans, new[:-1]]  # the user's turn; the reply's opening token goes with it
        yield from self._reply(logits, turn, started, opening=new[-1:])

    def _reply(self, logits: torch.Tensor, turn: dict, started: float, opening: list[int]) -> Iterator[int]:
        reply: list[int] = []
        first = None
        try:
            while len(reply) < self.max_new_tokens:
                token = int(draw(logits, self.sampling, self.generator, reply))  # (penalties: the reply's)
                first = first or time.perf_counter()
                if ends_reply(token):  # the end of the turn (or another token that is not text)
                    turn["stopped"] = True
                    break
                reply.append(token)
                self.ids.append(token)
                yield token
                if len(self.ids) >= self.context:
                    self.on_notice(f"[the reply filled the {self.context}-token context]")
                    break
                if len(reply) < self.max_new_tokens:
                    logits = self._run()
                    turn["decode_steps"] += 1
        finally:
            self._close(opening, reply, turn, started, first)

    def _close(
        self, opening: list[int], reply: list[int], turn: dict, started: float, first: float | None
    ) -> None:
        """End the turn with its end token (sampled or not), keep the reply's tokens, record the timings."""
        self.ids.append(chat.ASSISTANT_END_ID)
        self.spans.append([*opening, *reply, chat.ASSISTANT_END_ID])
        self.messages.append({"role": "assistant", "content": get_tokenizer().decode(reply)})
        now = time.perf_counter()
        first = first or now
        turn.update(reply_tokens=len(reply), first_token_s=first - started, decode_s=now - first)
        self.turns.append(turn)

    def reply(self, text: str) -> str:
        """The whole reply to `text`, as text."""
        return get_tokenizer().decode(list(self.send(text)))


@torch.no_grad()
def greedy_reply(model: GPT, prompt: list[int], max_new_tokens: int) -> tuple[list[int], int | None]:
    """The greedy reply to rendered prompt ids (opened for the assistant): its tokens, and the token
    that ended it (`sampling.ends_reply`) among its first `max_new_tokens` tokens, if one did."""
    device = next(model.parameters()).device
    cache = KVCache.empty(model.config, 1, device, model.transformer.wte.weight.dtype)
    logits = model.logits(model.hidden(torch.tensor([prompt], device=device), cache)[:, -1])
    step = Decoder(model)
    reply: list[int] = []
    for _ in range(max_new_tokens):
        token = int(draw(logits, GREEDY, None))
        if ends_reply(token):
            return reply, token
        reply.append(token)
        if len(prompt) + len(reply) >= model.config.block_size:
            break
        logits = step(torch.tensor([[token]], device=device), cache)
    return reply, None
