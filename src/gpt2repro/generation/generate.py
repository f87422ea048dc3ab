"""Autoregressive sampling with a preallocated KV cache, through the one sampler (`sampling`).

Generation stops when the sequence reaches the model's block_size (the returned tensor is then
shorter than prompt + max_new_tokens); it never silently crops context, so cached and recomputed
decoding always see the same tokens. `sample_tokens` (the `sample` command and the in-loop samples)
draws row i with seed + i, as the server draws choice i, and ends each row at its first token that is
not text (`sampling.ends_reply`)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..model.gpt import GPT
from ..model.kvcache import KVCache
from .decoding import Decoder
from .sampling import GenerateError, Sampling, draw_rows, ends_reply, filter_logits

__all__ = [
    "GenerateError",
    "filter_logits",
    "generate",
    "prompt_tokens",
    "sample_text",
    "sample_tokens",
    "stream_tokens",
]

ORIGINAL = Sampling(top_k=50)  # GPT-2's own samples: top-50 at temperature 1


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    sampling: Sampling,
    until_end: bool = False,
    compiled: bool = False,
    use_cache: bool = True,
) -> torch.Tensor:
    """Extend idx (B, T) by up to max_new_tokens, row i drawn as `sampling` draws row i (its seed +
    i, its penalties over the row's own tokens), as it would be drawn alone. `until_end`: stop once
    every row has drawn a token that ends a reply (the rows are not cut: see `sample_tokens`).
    `compiled`: the one-token steps compiled whole (`decoding.Decoder`). `use_cache=False`: every
    token recomputes the whole sequence through the model's forward (a reference, slow)."""
    if compiled and not use_cache:
        raise GenerateError("compiled decoding steps read the KV cache: they need use_cache=True")
    steps = min(max_new_tokens, model.config.block_size - idx.size(1))
    if steps < 0:
        raise ValueError(f"prompt of {idx.size(1)} tokens exceeds block_size={model.config.block_size}")
    was_training = model.training
    model.eval()
    ended = torch.zeros(idx.size(0), dtype=torch.bool)
    try:
        for tok in _draws(model, idx, steps, sampling, compiled, use_cache):
            idx = torch.cat([idx, tok], dim=1)
            if until_end:
                ended |= torch.tensor([ends_reply(t) for t in tok[:, 0].tolist()])
                if bool(ended.all()):
                    break
    finally:
        model.train(was_training)
    return idx


def _draws(
    model: GPT, idx: torch.Tensor, steps: int, sampling: Sampling, compiled: bool, use_cache: bool
) -> Iterator[torch.Tensor]:
    """Each step's drawn tokens (B, 1); the next step's logits are worked out only when asked for."""
    gens = [sampling.generator(idx.device, i) for i in range(idx.size(0))]
    drawn: list[list[int]] = [[] for _ in gens]
    if use_cache:
        step = Decoder(model, compiled)
        cache = KVCache.empty(model.config, idx.size(0), idx.device, model.transformer.wte.weight.dtype)
        logits = model.logits(model.hidden(idx, cache)[:, -1])
    for i in range(steps):
        if not use_cache:
            logits = model.logits(model.hidden(idx)[:, -1])
        tok = draw_rows(logits, sampling, gens, drawn)
        yield tok
        idx = torch.cat([idx, tok], dim=1)
        if use_cache and i + 1 < steps:
            logits = step(tok, cache)


def stream_tokens(
    model: GPT, prompt_ids: list[int], max_new_tokens: int, *, sampling: Sampling, compiled: bool = False
) -> Iterator[int]:
    """The tokens of one continuation as they are drawn: `sample_tokens`'s first row (the same seed,
    the same tokens), ending before its first token that is not text; `compiled`: see `generate`."""
    sampling.check(model.config.vocab_size)
    if max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    model.eval()
    steps = min(max_new_tokens, model.config.block_size - idx.size(1))
    with torch.no_grad():
        for tok in _draws(model, idx, steps, sampling, compiled, True):
            token = int(tok[0, 0])
            if ends_reply(token):
                return
            yield token


def encode_prompt(prompt: str) -> list[int]:
    """A prompt as plain text; text spelling a special token is refused, as in chat messages (the
    one rule of every prompt: README, "Special tokens in prompts")."""
    from ..text.chat import spelled_special
    from ..text.tokenizer import get_tokenizer

    spelled = spelled_special(prompt)
    if spelled:
        raise GenerateError(
            f"the prompt contains the special token {spelled}: prompts are plain text, and text that "
            "spells a special token is refused rather than read as the token"
        )
    return get_tokenizer().encode_ordinary(prompt)


def prompt_tokens(prompt: str, block_size: int) -> list[int]:
    """The prompt's tokens, if there are some and room after them to generate."""
    ids = encode_prompt(prompt)
    if not ids:
        raise GenerateError("the prompt is empty")
    if len(ids) >= block_size:
        raise GenerateError(f"the prompt is {len(ids)} tokens; this model's block_size is {block_size}")
    return ids


def sample_tokens(
    model: GPT,
    prompt_ids: list[int],
    n: int,
    max_new_tokens: int,
    *,
    sampling: Sampling,
    compiled: bool = False,
) -> list[list[int]]:
    """n continuations of `prompt_ids` (row i drawn with seed + i), each ending before its first token
    that is not text; `compiled`: see `generate`."""
    sampling.check(model.config.vocab_size)
    if n < 1 or max_new_tokens < 1:
        raise GenerateError(f"n and max_new_tokens must be at least 1, got {n} and {max_new_tokens}")
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids] * n, dtype=torch.long, device=device)
    out = generate(model, idx, max_new_tokens, sampling=sampling, until_end=True, compiled=compiled)
    rows = [row[len(prompt_ids) :].tolist() for row in out]
    return [row[: next((j for j, t in enumerate(row) if ends_reply(t)), len(row))] for row in rows]


def sample_text(
    model: GPT,
    prompt: str,
    n: int = 4,
    max_new_tokens: int = 32,
    *,
    sampling: Sampling = ORIGINAL,
    compiled: bool = False,
) -> list[str]:
    """n samples continuing `prompt` (the prompt included), reproducible for a seed (the original's
    top-50 sampling by default); `compiled`: see `generate`."""
    from ..text.tokenizer import get_tokenizer

    prompt_ids = prompt_tokens(prompt, model.config.block_size)
    rows = sample_tokens(model, prompt_ids, n, max_new_tokens, sampling=sampling, compiled=compiled)
    return [get_tokenizer().decode(prompt_ids + row) for row in rows]
