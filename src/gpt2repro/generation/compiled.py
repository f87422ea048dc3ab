"""One-token decoding steps compiled whole: every layer, the attention over the cache and the lm_head
in one torch.compile graph, called once per token.

At batch 1 a CPU decoding step is bound by reading the weights; what eager PyTorch adds around the
~50 matmuls (per-op dispatch, a dozen small kernels per layer, each touching memory the weights have
just pushed out of the caches) is most of the rest. Compiled, the small ops fuse into a few kernels
and the wrapper (`cpp_wrapper`: C++, not Python) calls them with almost no overhead
(benchmarks/RESULTS.md, "Decoding against llama.cpp"). The price is compiling once per model and
process, tens of seconds: worth it for long generations and benchmarks, not for a short sample.

The graph only reads the cache. A new token's attention is computed over the cached keys and its
own key apart, joined in one softmax, and its keys and values come back to be stored by one copy
afterwards: written inside the graph, torch.compile would copy the whole cache each step. Every slot
must be at the same length (`generate`'s rows are); the arithmetic is `Block.forward`'s with the
softmax's sums in another order, so logits agree to float rounding, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..model.gpt import GPT
from ..model.kvcache import KVCache
from .sampling import GenerateError

OPTIONS = {"cpp_wrapper": True}  # inductor: kernels called from C++, not from a Python wrapper


def _attend(q, k_old, v_old, k_new, v_new) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the cached keys and values (slots, heads, start, d) and the
    new token's own (slots, heads, 1, d): the two parts share one softmax. In fp32 whatever the
    weights' dtype (SDPA accumulates in fp32 too); for fp32 weights every cast is a no-op."""
    q, k_old, v_old, k_new, v_new = (t.float() for t in (q, k_old, v_old, k_new, v_new))
    scale = q.size(-1) ** -0.5
    s_old = (q @ k_old.transpose(-1, -2)) * scale
    s_new = (q * k_new).sum(-1, keepdim=True) * scale
    top = torch.maximum(s_old.amax(-1, keepdim=True), s_new)
    p_old, p_new = (s_old - top).exp(), (s_new - top).exp()
    return (p_old @ v_old + p_new * v_new) / (p_old.sum(-1, keepdim=True) + p_new)


def _step(model: GPT, tok: torch.Tensor, k_old: torch.Tensor, v_old: torch.Tensor):
    """Logits (slots, vocab) of one new token per slot after the cached ones (k_old, v_old:
    (n_layer, slots, heads, start, d)), and the new token's keys and values (n_layer, slots, heads,
    1, d)."""
    t, cfg = model.transformer, model.config
    B, C, H = tok.size(0), cfg.n_embd, cfg.n_head
    x = t.wte(tok) + t.wpe.weight[k_old.size(3)]
    keys, values = [], []
    for i, block in enumerate(t.h):
        q, k, v = block.attn.c_attn(block.ln_1(x)).view(B, 3, H, 1, C // H).unbind(1)
        y = _attend(q, k_old[i], v_old[i], k, v).to(q.dtype)
        x = x + block.attn.c_proj(y.reshape(B, 1, C))
        x = x + block.mlp(block.ln_2(x))
        keys.append(k)
        values.append(v)
    return model.logits(t.ln_f(x))[:, -1], torch.stack(keys), torch.stack(values)


def compiled_steps(model: GPT) -> Callable[[torch.Tensor, KVCache], torch.Tensor]:
    """A function of (tokens (slots, 1), cache) -> logits (slots, vocab) that, like
    `model.logits(model.hidden(tokens, cache)[:, -1])`, stores the tokens' keys and values in the
    cache and moves it on. The cache must hold at least one token per slot, every slot as many.
    Not for FSDP's sharded models: the graph calls the blocks' layers, not the blocks, whose hooks
    would gather the shards."""
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        raise GenerateError("compiled decoding steps need a whole model, not FSDP's shards")
    compiled = torch.compile(_step, options=OPTIONS)

    def step(tok: torch.Tensor, cache: KVCache) -> torch.Tensor:
        start = cache.aligned_length()
        if start == 1:  # a cache of length 1 would be compiled apart (torch.compile fixes sizes 0 and 1)
            return model.logits(model.hidden(tok, cache)[:, -1])
        k_old, v_old = cache.k[..., :start, :], cache.v[..., :start, :]
        torch._dynamo.mark_dynamic(k_old, 3)  # one graph for every cache length
        torch._dynamo.mark_dynamic(v_old, 3)
        try:
            logits, k, v = compiled(model, tok, k_old, v_old)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GenerateError(
                f"compiling the decoding step failed ({first}): decode without compiling"
            ) from e
        cache.append(k, v)
        return logits

    return step
