"""Autoregressive sampling with a preallocated KV cache.

Generation stops when the sequence reaches the model's block_size (the returned tensor is then
shorter than prompt + max_new_tokens); it never silently crops context, so cached and recomputed
decoding always see the same tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import UserError
from .kvcache import KVCache
from .model import GPT


class GenerateError(UserError, ValueError):
    """Sampling arguments that cannot work (empty or too long a prompt, a bad count); one line."""


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set everything outside the top-k / nucleus (top-p) to -inf. logits: (B, V)."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: torch.Tensor, temperature: float, top_k, top_p, generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    probs = F.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Extend idx (B, T) by up to max_new_tokens; temperature=0 is greedy decoding."""
    was_training = model.training
    model.eval()
    steps = min(max_new_tokens, model.config.block_size - idx.size(1))
    if steps < 0:
        raise ValueError(f"prompt of {idx.size(1)} tokens exceeds block_size={model.config.block_size}")
    cache = None
    if use_cache:
        dtype = model.transformer.wte.weight.dtype
        cache = KVCache.empty(model.config, idx.size(0), idx.device, dtype)
        logits = model.logits(model.hidden(idx, cache)[:, -1])
    for i in range(steps):
        if not use_cache:
            logits = model.logits(model.hidden(idx)[:, -1])
        tok = next_token(logits, temperature, top_k, top_p, generator)
        idx = torch.cat([idx, tok], dim=1)
        if use_cache and i + 1 < steps:
            logits = model.logits(model.hidden(tok, cache)[:, -1])
    model.train(was_training)
    return idx


def encode_prompt(prompt: str) -> list[int]:
    """A prompt as plain text; text spelling a special token is refused, as in chat messages (the
    one rule of every prompt: README, "Special tokens in prompts")."""
    from .chat import spelled_special
    from .tokenizer import get_tokenizer

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


def sample_text(
    model: GPT,
    prompt: str,
    n: int = 4,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_k: int | None = 50,
    seed: int = 42,
) -> list[str]:
    """n samples continuing `prompt`, reproducible for a seed (the original's top-50 sampling)."""
    from .tokenizer import get_tokenizer

    enc = get_tokenizer()
    prompt_ids = encode_prompt(prompt)
    block = model.config.block_size
    checks = [
        (bool(prompt_ids), "the prompt is empty"),
        (
            len(prompt_ids) < block,
            f"the prompt is {len(prompt_ids)} tokens; this model's block_size is {block}",
        ),
        (n >= 1, f"n must be at least 1, got {n}"),
        (max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {max_new_tokens}"),
        (top_k is None or top_k >= 1, f"top_k must be at least 1, got {top_k}"),
        (0 <= temperature < math.inf, f"temperature must be a finite number >= 0, got {temperature}"),
    ]
    for ok, problem in checks:
        if not ok:
            raise GenerateError(problem)
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids] * n, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    return [enc.decode(row.tolist()) for row in out]
