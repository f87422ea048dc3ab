"""A conversation with a chat model, held in its KV cache across turns.

`ChatSession.send(text)` yields the reply's tokens as they are sampled. The keys and values of every
token so far stay in the cache, so a new turn runs only its own tokens through the model (the user
turn and the tokens opening the reply), never the history again: `forward_tokens` counts what ran.
When the history and a new turn no longer fit the context (with room left for a reply), the oldest
turns are dropped and the rest is encoded afresh, and `on_notice` says so. A reply ends at the end
of the assistant's turn (`chat.STOP_TOKENS`), at `max_new_tokens`, or when the context is full; the
turn is then closed with its end token either way, so the history stays a well-formed conversation.

One sequence with a position counter: a server holding many (issue #24) keeps one session (cache and
position) per conversation; `chat.render` and `chat.STOP_TOKENS` are the format it needs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

from . import chat
from .generate import GenerateError, next_token
from .kvcache import KVCache
from .model import GPT
from .tokenizer import EOT_ID, get_tokenizer


def require_chat_model(model: GPT, what: str = "this model") -> None:
    if not model.config.chat:
        raise GenerateError(
            f"{what} is a base model without chat tokens (model.chat=false): fine-tune it with the sft "
            "preset first, or continue text with `gpt2repro sample`"
        )


class ChatSession:
    """One conversation: its messages, the tokens in the cache and the position, sampling settings."""

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
    ):
        require_chat_model(model)
        if max_new_tokens < 1 or (top_k is not None and top_k < 1) or not 0 <= temperature < float("inf"):
            raise GenerateError(
                f"sampling needs max_new_tokens >= 1, top_k >= 1 and a finite temperature >= 0 "
                f"(got {max_new_tokens}, {top_k}, {temperature})"
            )
        self.model, self.system, self.on_notice = model, system, on_notice  # no dropout: any mode
        self.max_new_tokens, self.temperature, self.top_k = max_new_tokens, temperature, top_k
        self.reuse_cache = reuse_cache  # False re-encodes the whole history every turn (a benchmark)
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.cache = KVCache.empty(model.config, 1, self.device, model.transformer.wte.weight.dtype)
        self.forward_tokens = 0
        self.turns: list[dict] = []  # per reply: prompt tokens run, first-token latency, decode time
        self.reset()

    @property
    def context(self) -> int:
        return self.model.config.block_size

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        chat.check(self.messages or [{"role": "user", "content": ""}])
        self.ids: list[int] = []  # every token of the conversation, in order
        self.cached = 0  # how many of them the cache holds

    def _turn_ids(self, text: str, messages: list[dict], ids: list[int]) -> list[int]:
        """The tokens a new user turn adds to a history, the reply's opening included."""
        message = {"role": "user", "content": text}
        chat.check([*messages, message])
        if not ids:
            return chat.render([*messages, message], add_generation_prompt=True)
        return chat.render([message], add_generation_prompt=True)[1:]  # without the leading <|endoftext|>

    def _fit(self, text: str) -> list[int]:
        """The new turn's tokens, after dropping the oldest turns if the context needs the room
        (the system message stays). A message too long even alone changes nothing."""
        reserve = min(self.max_new_tokens, self.context // 2)
        first = int(self.system is not None)
        messages, ids, cached = self.messages, self.ids, self.cached
        new = self._turn_ids(text, messages, ids)
        dropped = 0
        while len(ids) + len(new) + reserve > self.context and len(messages) > first:
            turns = messages[first:]
            cut = next((i for i in range(1, len(turns)) if turns[i]["role"] == "user"), len(turns))
            messages = messages[:first] + turns[cut:]
            ids, cached = (chat.render(messages) if messages else []), 0
            new, dropped = self._turn_ids(text, messages, ids), dropped + 1
        if len(ids) + len(new) >= self.context:
            raise GenerateError(
                f"the message needs {len(ids) + len(new)} tokens with the conversation; this model's "
                f"context is {self.context}"
            )
        self.messages, self.ids, self.cached = messages, ids, cached
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
        h = self.model.hidden(idx, self.cache)
        self.cached += len(todo)
        self.forward_tokens += len(todo)
        return self.model.logits(h[:, -1])

    def send(self, text: str) -> Iterator[int]:
        """The user says `text`: yields the reply's token ids as they are sampled (not the end token).
        Any other special token the model samples also ends the reply (and is not kept)."""
        started = time.perf_counter()
        new = self._fit(text)
        self.messages.append({"role": "user", "content": text})
        self.ids += new
        self.cached = self.cached if self.reuse_cache else 0
        turn = dict(prompt_tokens=len(self.ids) - self.cached, reply_tokens=0, decode_steps=0, stopped=False)
        logits = self._run()
        reply: list[int] = []
        first = None
        try:
            while len(reply) < self.max_new_tokens:
                token = int(next_token(logits, self.temperature, self.top_k, None, self.generator))
                first = first or time.perf_counter()
                if token >= EOT_ID:  # the end of the turn (or a special token out of place)
                    turn["stopped"] = token in chat.STOP_TOKENS
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
            self._close(reply, turn, started, first)

    def _close(self, reply: list[int], turn: dict, started: float, first: float | None) -> None:
        """End the turn with its end token (sampled or not), keep the message, record the timings."""
        self.ids.append(chat.ASSISTANT_END_ID)
        self.messages.append({"role": "assistant", "content": get_tokenizer().decode(reply)})
        now = time.perf_counter()
        first = first or now
        turn.update(reply_tokens=len(reply), first_token_s=first - started, decode_s=now - first)
        self.turns.append(turn)

    def reply(self, text: str) -> str:
        """The whole reply to `text`, as text."""
        return get_tokenizer().decode(list(self.send(text)))


@torch.no_grad()
def greedy_reply(model: GPT, prompt: list[int], max_new_tokens: int) -> tuple[list[int], bool]:
    """The greedy reply to rendered prompt ids (opened for the assistant): its tokens, and whether
    it ended with the end-of-turn token among its first `max_new_tokens` tokens."""
    device = next(model.parameters()).device
    cache = KVCache.empty(model.config, 1, device, model.transformer.wte.weight.dtype)
    logits = model.logits(model.hidden(torch.tensor([prompt], device=device), cache)[:, -1])
    reply: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits.argmax(-1))
        if token >= EOT_ID:
            return reply, token in chat.STOP_TOKENS
        reply.append(token)
        if len(prompt) + len(reply) >= model.config.block_size:
            break
        logits = model.logits(model.hidden(torch.tensor([[token]], device=device), cache)[:, -1])
    return reply, False
