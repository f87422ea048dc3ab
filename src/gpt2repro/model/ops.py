"""Hand-written kernels of training and scoring, kept apart so `gpt.py` stays the architecture.

`linear_cross_entropy`: the lm_head and the cross-entropy fused, chunk by chunk, so training never
holds the (tokens x vocabulary) logits; its `sum` reduction ignores negative targets (the tokens a chat
fine-tune does not learn). Decoding's kernels are in `generation/kernels.py`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

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


def _accumulate(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, first_of_many: bool):
    """acc += a @ b with no extra pass over acc: in place where the dtypes agree, through cuBLAS's
    fp32-output GEMM for bf16/fp16 inputs on CUDA; elsewhere (bf16 on CPU) a GEMM into scratch memory
    and an add. Returns the accumulator (scratch memory when there is only one chunk)."""
    wide = torch.float64 if a.dtype == torch.float64 else torch.float32
    if acc is None and not first_of_many:  # one chunk: the GEMM's own output, nothing to accumulate
        return torch.mm(a, b, out=_scratch("part", (a.size(0), b.size(1)), a.dtype, a.device))
    if acc is None:
        acc = torch.zeros(a.size(0), b.size(1), dtype=wide, device=a.device)
    if a.dtype == wide:
        return acc.addmm_(a, b)
    if a.device.type == "cuda":
        return torch.addmm(acc, a, b, out_dtype=wide, out=acc)
    return acc.add_(torch.mm(a, b, out=_scratch("part", acc.shape, a.dtype, a.device)))


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (h @ weight.T) against targets, a chunk of rows at a time, at the
    weight's full (padded) width: the GEMMs keep the multiple-of-64 vocabulary that the padding
    exists for, and the padded classes get a logit of -inf, so they are never predicted and their
    weight rows get exactly zero gradient.

    The lm_head is most of the FLOPs at small sizes, and its logits most of the memory traffic. Here
    each chunk's logits live only while that chunk's loss and its gradients with respect to h and
    weight are computed, in the forward pass; backward just scales them. Per chunk: one matmul, one
    fused softmax, the loss -log p[target] read from it, and p - onehot fed to two matmuls. Under
    bf16 autocast the softmax is stored in bf16: its rounding (2^-9 relative in p, ~0.002 in a
    token's loss) is ten times smaller than that of the bf16 logits themselves. p[target] underflows
    only when the target's logit is ~87 below the log-sum-exp (fp32 and bf16 share the exponent
    range); fp16, whose softmax would underflow 17 nats below it, never comes here
    (see `linear_cross_entropy`). `masked`: the sum over the targets >= 0, the others ignored (no
    loss, zero gradient); otherwise the mean over all rows, every target a class."""

    @staticmethod
    def forward(ctx, h, weight, targets, vocab, chunk, need_grad, masked):
        device_type = h.device.type
        compute = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type, enabled=False):
            n, dim = h.shape
            width = weight.size(0)
            dev = h.device
            w = (
                weight
                if weight.dtype == compute
                else _scratch("weight", (width, dim), compute, dev).copy_(weight)
            )
            hc_all = h.to(compute)
            grad_h = torch.empty_like(h) if need_grad else None
            grad_wt = None  # weight gradient, transposed (the faster matmul)
            total = torch.zeros((), dtype=acc, device=dev)
            for s in range(0, n, chunk):
                hc, t = hc_all[s : s + chunk], targets[s : s + chunk]
                logits = torch.mm(hc, w.t(), out=_scratch("logits", (len(t), width), compute, dev))
                logits[:, vocab:] = float("-inf")  # padded classes: probability exactly 0
                grad = torch.softmax(logits, -1, out=_scratch("probs", (len(t), width), compute, dev))
                rows = torch.arange(len(t), device=dev)  # grad becomes d(loss)/d(logits) * n
                if masked:
                    keep = t >= 0
                    t = t.clamp(min=0)
                picked = grad[rows, t].to(acc).log()
                total -= (picked.masked_fill(~keep, 0.0) if masked else picked).sum()
                if not need_grad:  # validation: the loss alone, one matmul per chunk instead of three
                    continue
                grad[rows, t] -= keep.to(grad.dtype) if masked else 1.0
                if masked:
                    grad.masked_fill_(~keep[:, None], 0.0)  # ignored rows: no gradient at all
                grad_h[s : s + chunk] = grad @ w
                grad_wt = _accumulate(grad_wt, hc.t(), grad, first_of_many=n > chunk)
            n = 1 if masked else n  # a sum: nothing to divide by
            if need_grad:
                grad_w = torch.mul(grad_wt.t(), 1.0 / n, out=torch.empty_like(weight))
                ctx.save_for_backward(grad_h.div_(n), grad_w)
        return (total / n).to(torch.float32 if h.dtype != torch.float64 else h.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h.mul_(grad_out), grad_w.mul_(grad_out), None, None, None, None, None  # once per forward


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
    logits = F.linear(h, weight)  # the autocast dtype, at the padded width
    return F.cross_entropy(logits[:, :vocab].float(), targets, reduction="sum", ignore_index=-1)


def _recomputed_cross_entropy(
    h, weight, targets, vocab: int, chunk: int, masked: bool = False
) -> torch.Tensor:
    """The same loss through autograd, a chunk at a time, each chunk's logits recomputed in backward:
    for fp16, whose gradients must be formed in backward, where GradScaler's scale keeps them from
    underflowing and its inf check sees them (costs one more lm_head matmul than the fused path).
    `masked`: the sum over targets >= 0 (the -1 of the loader's masks ignored), not the mean."""
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.size(0), chunk):
        part = (h[s : s + chunk], weight, targets[s : s + chunk], vocab)
        if torch.is_grad_enabled():
            total = total + torch.utils.checkpoint.checkpoint(_chunk_loss, *part, use_reentrant=False)
        else:
            total = total + _chunk_loss(*part)
    return total if masked else total / h.size(0)


@torch.compiler.disable  # runs as written under torch.compile: it is already fused by hand
def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab: int,
    chunk: int = 2048,
    reduction: str = "mean",
) -> torch.Tensor:
    """lm_head + cross-entropy over rows of h (N, C); only weight's first `vocab` rows are classes,
    so padded ids are never predicted. `mean`: over all rows (every target a class); `sum`: over the
    targets >= 0, negative ones ignored (a loss mask; the caller divides by the count it wants, e.g.
    a whole step's learned tokens). Fused by hand, except under fp16 autocast."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: expected mean or sum")
    masked = reduction == "sum"
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16:
        return _recomputed_cross_entropy(h, weight, targets, vocab, chunk, masked)
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(h, weight, targets, vocab, chunk, need_grad, masked)
