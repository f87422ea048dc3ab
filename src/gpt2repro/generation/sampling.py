"""How every entry point draws a token, and where a reply ends: one sampler and one rule for `sample`,
the in-loop samples, `chat` and its `ChatSession`, the SFT samples, `eval chat`'s greedy replies, the
server's engine and the exported `generation_config.json`.

The sampler: OpenAI's adjustments first (`logit_bias` added to the logits of its token ids, then
`presence_penalty` and `frequency_penalty` over the tokens drawn so far: logit -= presence x (count > 0)
+ frequency x count), then logits divided by `temperature` (0: the most likely token), then only the `top_k` most
likely tokens (None or 0: all), then the smallest set whose probability reaches `top_p` (the token
that crosses it included), drawn with a generator seeded by `seed` (choice or row i of a request:
`seed + i`). The rule: a reply (or a continuation) ends at the first token that is not text, i.e.
`<|endoftext|>` or any chat token (every id from 50256 up); that token is not part of the reply.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..text.tokenizer import EOT_ID


class GenerateError(UserError, ValueError):
    """Sampling arguments that cannot work (empty or too long a prompt, a bad count); one line."""


def ends_reply(token: int) -> bool:
    """Whether `token` ends a reply: it is not text (<|endoftext|> or a chat token)."""
    return token >= EOT_ID


def end_ids(vocab_size: int) -> list[int]:
    """Every id of a vocabulary that ends a reply (what generation_config.json lists as eos)."""
    return list(range(EOT_ID, vocab_size))


@dataclass(frozen=True)
class Sampling:
    """The settings of one sampler, the same meaning everywhere (see the module's docstring)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int = 42
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), OpenAI's -100..100
    presence_penalty: float = 0.0  # OpenAI's -2..2, per token already drawn
    frequency_penalty: float = 0.0  # OpenAI's -2..2, per time a token was drawn

    @classmethod
    def make(cls, logit_bias: dict[int, float] | None = None, **settings) -> Sampling:
        """A Sampling from keywords, `logit_bias` as OpenAI's {token id: bias} (the Python API's)."""
        return cls(logit_bias=tuple((logit_bias or {}).items()), **settings)

    def check(self, vocab_size: int | None = None) -> Sampling:
        """self, or a GenerateError naming the setting that cannot work (`vocab_size`: the model's,
        which logit_bias's token ids must be below, where it is known)."""
        ids = f">= 0 and < {vocab_size}" if vocab_size else ">= 0"
        problems = [
            (0 <= self.temperature < math.inf, f"temperature must be a finite number >= 0, got {self.temperature}"),
            (self.top_k is None or self.top_k >= 0, f"top_k must be at least 0 (0: no limit), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be above 0 and at most 1, got {self.top_p}"),
            (-(2**63) <= self.seed < 2**64, f"the seed must fit in 64 bits, got {self.seed}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be between -2 and 2, got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be between -2 and 2, got {self.frequency_penalty}"),
            *((isinstance(t, int) and 0 <= t < (vocab_size or math.inf) and -100 <= b <= 100,
               f"logit_bias must map token ids {ids} to -100..100, got {t!r}: {b}") for t, b in self.logit_bias),
        ]  # fmt: skip
        for ok, problem in problems:
            if not ok:
                raise GenerateError(problem)
        return self

    def adjusted(self, logits: torch.Tensor, drawn: Sequence[int] = ()) -> torch.Tensor:
        """`logits` (B, V) of one sequence whose tokens drawn so far are `drawn`, with the logit bias
        (ids in range) and the penalties applied (OpenAI's order: before temperature)."""
        if not self.logit_bias and not (drawn and (self.presence_penalty or self.frequency_penalty)):
            return logits
        logits = logits.float().clone()
        width = logits.size(-1)
        bias = [(t, b) for t, b in self.logit_bias if t < width]
        if bias:
            ids, values = zip(*bias)
            logits[..., list(ids)] += torch.tensor(values, device=logits.device)
        if drawn and (self.presence_penalty or self.frequency_penalty):
            counts = torch.bincount(torch.tensor(drawn, device=logits.device), minlength=width)[
                :width
            ].float()
            logits -= self.presence_penalty * (counts > 0).float() + self.frequency_penalty * counts
        return logits

    def generator(self, device, index: int = 0) -> torch.Generator:
        """The generator of row or choice `index`: seeded with seed + index."""
        return torch.Generator(device=device).manual_seed((self.seed + index) % 2**64)


GREEDY = Sampling(temperature=0)  # the most likely token every time


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set everything outside the top-k / nucleus (top-p) to -inf. logits: (B, V)."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw(
    logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None, drawn: Sequence[int] = ()
) -> torch.Tensor:
    """The next token of each row of `logits` (B, V), one sequence that has drawn `drawn`: (B, 1)."""
    logits = sampling.adjusted(logits, drawn)
    if sampling.temperature == 0:
        return logits.argmax(-1, keepdim=True)
    scaled = filter_logits(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p)
    return torch.multinomial(F.softmax(scaled, dim=-1), 1, generator=generator)


def draw_rows(
    logits: torch.Tensor, sampling: Sampling, generators: list[torch.Generator], drawn: list[list[int]]
) -> torch.Tensor:
    """Row i drawn with generators[i] after its tokens drawn[i] (which it extends), as that row would
    be drawn in a batch of one: (B, 1). Greedy rows without penalties are drawn together."""
    if sampling.temperature == 0 and not (sampling.presence_penalty or sampling.frequency_penalty):
        tok = draw(logits, sampling, None)
    else:
        tok = torch.cat([draw(logits[i : i + 1], sampling, g, drawn[i]) for i, g in enumerate(generators)])
    for row, t in zip(drawn, tok[:, 0].tolist()):
        row.append(t)
    return tok
