"""GPT-2, readable in one file.

Parameter names are exactly the Hugging Face `GPT2LMHeadModel` state-dict keys so checkpoints move
both ways (HF stores the Conv1D weights transposed; `hf.py` handles that). The lm_head shares storage
with the token embedding. The embedding may be padded past the real vocabulary for faster matmuls;
padded ids are cut from the logits, so they are never predicted, sampled or scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .config import GPTConfig


@dataclass
class KVCache:
    """Preallocated keys/values for every layer: (n_layer, B, n_head, block_size, head_dim)."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(cls, config: GPTConfig, batch: int, device, dtype: torch.dtype) -> KVCache:
        hd = config.n_embd // config.n_head
        shape = (config.n_layer, batch, config.n_head, config.block_size, hd)
        return cls(
            torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
        )


class Linear(nn.Linear):
    """nn.Linear, plus a faster path for decoding on a multi-core CPU.

    With a few rows of fp32 input (one new token per sequence), the matmul is bound by reading the
    weight, and MKL's matrix-vector product runs on one core. Splitting the output features into one
    group per thread and running the groups as a batched matmul uses every core (`gpt2repro bench
    generate` measures it). Same result up to fp32 rounding order."""

    MAX_ROWS = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = torch.get_num_threads()
        out_features, in_features = self.weight.shape
        rows = x.numel() // in_features
        if (
            torch.compiler.is_compiling()
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or self.weight.dtype != torch.float32
            or torch.is_autocast_enabled("cpu")
            or rows > self.MAX_ROWS
            or groups < 2
            or out_features % groups
            or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        ):
            return super().forward(x)
        w = self.weight.view(groups, out_features // groups, in_features)
        x2 = x.reshape(rows, in_features).t().expand(groups, in_features, rows)
        y = torch.bmm(w, x2).view(out_features, rows).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], out_features)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.n_head = config.n_head
        self.layer = layer
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE = True  # init scaled by (2*n_layer)^-0.5

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, pos: int = 0, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if mask is not None:  # an explicit (B, 1, T, T) mask, e.g. packed sequences
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # flash kernel where available
        else:
            cache.k[self.layer, :, :, pos : pos + T] = k
            cache.v[self.layer, :, :, pos : pos + T] = v
            k, v = cache.k[self.layer, :, :, : pos + T], cache.v[self.layer, :, :, : pos + T]
            if T == 1:  # one new token attends to everything cached
                y = F.scaled_dot_product_attention(q, k, v)
            else:  # query i sits at absolute position pos+i and sees keys 0..pos+i
                mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's "gelu_new"


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, pos: int = 0, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, pos, mask)
        return x + self.mlp(self.ln_2(x))


class WeightsMismatch(ValueError):
    """A state dict does not fit the model; the message lists every missing, unexpected and
    mis-shaped key. Callers (checkpoints, HF loading) wrap it in their own error naming the file."""


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into `model`, or raise WeightsMismatch before changing anything."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = [("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)]
    if any(items for _, items in problems):
        raise WeightsMismatch(
            "; ".join(
                f"{what}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
                for what, items in problems
                if items
            )
        )
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k])


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config.validate()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            )
        )
        self.lm_head = Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one tensor, one gradient
        # activation checkpointing: every n-th block's activations are recomputed in backward (0: off).
        # A training setting, not architecture: it changes memory and time, never the result.
        self.checkpoint_every = 0
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = (
                0.02 * (2 * self.config.n_layer) ** -0.5 if getattr(module, "RESIDUAL_SCALE", False) else 0.02
            )
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def copy_weights_from(self, other: GPT) -> None:
        """Start from `other`'s weights (same architecture; the vocabulary may be padded otherwise):
        the real vocabulary's rows are copied, padded rows keep their initialisation."""
        state = other.state_dict()
        wte = self.transformer.wte.weight.detach().clone()
        vocab = self.config.vocab_size
        wte[:vocab] = state["transformer.wte.weight"][:vocab]
        state["transformer.wte.weight"] = state["lm_head.weight"] = wte
        load_state_strict(self, state)

    def num_params(self) -> int:
        """Unique parameters (the tied lm_head counted once), as published for GPT-2."""
        return sum(p.numel() for p in self.parameters())

    def hidden(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        pos: int = 0,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-LayerNorm hidden states (B, T, n_embd). `pos` is the absolute position of idx[:, 0];
        or, for packed sequences, explicit `positions` (B, T) with an attention `mask` (B, 1, T, T)."""
        T = idx.size(1)
        last = int(positions.max()) + 1 if positions is not None else pos + T
        if last > self.config.block_size:
            raise ValueError(
                f"sequence of {last} tokens exceeds block_size={self.config.block_size}; crop the input"
            )
        if positions is None:
            positions = torch.arange(pos, pos + T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(positions)
        every = self.checkpoint_every if torch.is_grad_enabled() and cache is None else 0
        for i, block in enumerate(self.transformer.h):
            if every and i % every == 0:  # recomputed in backward instead of keeping activations
                x = torch.utils.checkpoint.checkpoint(block, x, None, pos, mask, use_reentrant=False)
            else:
                x = block(x, cache, pos, mask)
        return self.transformer.ln_f(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over the real vocabulary only: padded rows of the embedding are never predicted."""
        return self.lm_head(h)[..., : self.config.vocab_size]

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits, None) without targets; (None, mean cross-entropy) with them. Training never
        materialises the (B, T, vocab) logits: see `linear_cross_entropy`."""
        h = self.hidden(idx)
        if targets is None:
            return self.logits(h), None
        return None, linear_cross_entropy(
            h.flatten(0, 1), self.lm_head.weight, targets.flatten(), self.config.vocab_size
        )

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6N plus attention, as in the PaLM appendix."""
        cfg = self.config
        n = self.num_params() - self.transformer.wpe.weight.numel()
        return 6 * n + 12 * cfg.n_layer * cfg.n_embd * seq_len


_CPU_SCRATCH: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def _scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Memory for the fused loss's big temporaries, reused across calls on CPU. There glibc maps every
    allocation over 32 MB afresh and the first touch page-faults it in again, a noticeable part of a
    small model's training step. (CUDA's caching allocator reuses memory by itself.)
    The buffers stay allocated for the life of the process: about 2 x chunk x vocab x 2 bytes."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    buf = _CPU_SCRATCH.get((name, dtype))
    if buf is None or buf.numel() < numel:
        buf = _CPU_SCRATCH[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (h @ weight[:vocab].T) against targets, a chunk of rows at a time.

    The lm_head is most of the FLOPs at small sizes, and its fp32 logits (N x 50k floats) most of the
    memory traffic. Here each chunk's logits live only while that chunk's loss and its gradients with
    respect to h and weight are computed, in the forward pass; backward just scales them. Per chunk:
    one matmul, one fused softmax, the loss -log p[target] read from it, and p - onehot fed to two
    matmuls. Under bf16 autocast the softmax is stored in bf16: its rounding (2^-9 relative in p,
    ~0.002 in a token's loss) is ten times smaller than that of the bf16 logits themselves, which
    the unfused version has too. p[target] underflows (fp32 and bf16 alike) only when the target's
    logit is ~100 below the log-sum-exp; the loss is then inf and training stops."""

    @staticmethod
    def forward(ctx, h, weight, targets, vocab, chunk, need_grad):
        device_type = h.device.type
        compute = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type, enabled=False):
            n, dim = h.shape
            dev = h.device
            w = weight[:vocab]
            if w.dtype != compute:
                w = _scratch("weight", (vocab, dim), compute, dev).copy_(w)
            hc_all = h.to(compute)
            grad_h = torch.empty_like(h) if need_grad else None
            grad_wt = None  # weight gradient, transposed (the faster matmul); fp32 once accumulating
            total = torch.zeros((), dtype=acc, device=dev)
            for s in range(0, n, chunk):
                hc, t = hc_all[s : s + chunk], targets[s : s + chunk]
                logits = torch.mm(hc, w.t(), out=_scratch("logits", (len(t), vocab), compute, dev))
                grad = torch.softmax(logits, -1, out=_scratch("probs", (len(t), vocab), compute, dev))
                rows = torch.arange(len(t), device=dev)  # grad becomes d(loss)/d(logits) * n
                total -= grad[rows, t].to(acc).log().sum()
                if not need_grad:  # validation: the loss alone, one matmul per chunk instead of three
                    continue
                grad[rows, t] -= 1.0
                grad_h[s : s + chunk] = grad @ w
                part = torch.mm(hc.t(), grad, out=_scratch("part", (dim, vocab), compute, dev))
                if grad_wt is None:  # scratch memory: copied out before the next chunk overwrites it
                    grad_wt = part if n <= chunk else part.to(acc, copy=True)
                else:
                    grad_wt.add_(part)
            if need_grad:
                grad_w = torch.empty_like(weight)
                grad_w[vocab:] = 0.0
                torch.mul(grad_wt.t(), 1.0 / n, out=grad_w[:vocab])
                ctx.save_for_backward(grad_h.div_(n), grad_w)
        return (total / n).to(torch.float32 if h.dtype != torch.float64 else h.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h.mul_(grad_out), grad_w.mul_(grad_out), None, None, None, None  # once per forward


@torch.compiler.disable  # runs as written under torch.compile: it is already fused by hand
def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab: int, chunk: int = 2048
) -> torch.Tensor:
    """Fused lm_head + mean cross-entropy over rows of h (N, C); only weight's first `vocab` rows
    are classes, so padded ids are never predicted."""
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(h, weight, targets, vocab, chunk, need_grad)
