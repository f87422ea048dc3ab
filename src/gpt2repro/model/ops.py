"""Hand-written kernels the model uses, kept apart so `gpt.py` stays the architecture.

- `Linear`: nn.Linear with a faster decoding path on multi-core CPUs; `decoding_layout` stores an
  inference model's fp32 weights the way MKL's one-row product reads fastest.
- `linear_cross_entropy`: the lm_head and the cross-entropy fused, chunk by chunk, so training never
  holds the (tokens x vocabulary) logits; its `sum` reduction ignores negative targets (the tokens a
  chat fine-tune does not learn).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("vendor_id")), "")
    except OSError:
        return ""


class Linear(nn.Linear):
    """nn.Linear, plus faster paths for decoding on a CPU, where a few rows of input (one new token
    per sequence) make the matmul bound by reading the weight.

    - bf16, one row: `torch.addmv`, whose bf16 matrix-vector kernel streams the weight faster than
      the oneDNN matmul F.linear dispatches to.
    - fp32, up to MAX_ROWS rows, off Intel: MKL runs this product on one core there (AMD EPYC,
      measured); splitting the output features into one group per thread and running the groups as
      a batched matmul uses every core. On Intel, MKL's own product already streams the weight on
      every core and the split halves its bandwidth, so it stays off.

    `gpt2repro bench generate` measures them (benchmarks/RESULTS.md). Same result up to rounding
    order. Under torch.compile, with autograd or autocast, and on any other device it is exactly
    nn.Linear: the check for compiling comes first, so Dynamo never traces the thread query that
    would break its graph."""

    MAX_ROWS = 32
    SPLIT = _cpu_vendor() != "GenuineIntel"  # whether the grouped fp32 path is taken at all

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = None if torch.compiler.is_compiling() else self._decode_path(x)
        if path == "mv":
            row = x.reshape(-1)
            y = torch.mv(self.weight, row) if self.bias is None else torch.addmv(self.bias, self.weight, row)
            return y.view(*x.shape[:-1], -1)
        if path != "split":
            return super().forward(x)
        groups = torch.get_num_threads()
        out_features, in_features = self.weight.shape
        rows = x.numel() // in_features
        w = self.weight.view(groups, out_features // groups, in_features)
        x2 = x.reshape(rows, in_features).t().expand(groups, in_features, rows)
        y = torch.bmm(w, x2).view(out_features, rows).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], out_features)

    def _decode_path(self, x: torch.Tensor) -> str | None:
        """ "mv", "split" or None (nn.Linear's own). The commonest case, fp32 on Intel, is settled
        first: this runs for each of the ~50 matmuls of every decoded token."""
        if (x.dtype == torch.float32 and not self.SPLIT) or x.dtype not in (torch.float32, torch.bfloat16):
            return None
        if (
            x.device.type != "cpu"
            or x.dtype != self.weight.dtype
            or torch.is_autocast_enabled("cpu")
            or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        ):
            return None
        out_features, in_features = self.weight.shape
        rows = x.numel() // in_features
        if x.dtype == torch.bfloat16:
            return "mv" if rows == 1 else None
        groups = torch.get_num_threads()
        return "split" if rows <= self.MAX_ROWS and groups > 1 and out_features % groups == 0 else None


def decoding_layout(model: nn.Module) -> nn.Module:
    """Lay every fp32 Linear weight of an inference model out for decoding, in place: the same
    (out, in) tensor of the same values, stored as the transpose of a contiguous (in, out) one. MKL
    then takes its column-streaming one-row product, which reads the weights faster than the
    row-dot one it uses for nn.Linear's layout (measured on Intel: benchmarks/RESULTS.md); prompts'
    multi-row products are no slower. Tied weights stay tied (the Parameter objects are kept): the
    token embedding is transposed too, and looking a token up reads one strided row, nothing next
    to a matmul.

    For sampling, chat and serving only: a model being trained keeps nn.Linear's layout, whose
    gradients and losses are the measured ones. Left as it is where the grouped split is taken (it
    was measured on the usual layout only), for bf16 weights (their one-row kernel is slower this
    way) and off the CPU. Saving the weights with safetensors directly needs `.contiguous()` (this
    project's writers do it)."""
    if Linear.SPLIT:
        return model
    with torch.no_grad():
        for module in model.modules():
            w = module.weight if isinstance(module, nn.Linear) else None
            if w is not None and w.dtype == torch.float32 and w.device.type == "cpu" and w.is_contiguous():
                w.data = w.data.t().contiguous().t()
    return model


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
