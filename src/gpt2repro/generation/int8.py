"""Int8 weights for decoding (`--weight-dtype int8`): batch-1 decoding reads every weight once per
token, so a quarter of fp32's bytes is the one large step left on a CPU (benchmarks/RESULTS.md).

Each Linear weight row (output feature) is rounded to 127 steps of its largest |value|, symmetric:
w ≈ q * scale, q in int8, |w - q * scale| <= scale / 2. The model keeps those values, dequantized,
in its fp32 weights, so its forward (the prompt, the reference) computes with exactly what the
decoding steps read as int8; the tied embedding looks its rows up there too.

The decoding matmul reads the int8 rows and their scales in one compiled loop (inductor's C++,
fp32 products and sums, each weight converted in registers): torch's own CPU kernel
(`torch._weight_int8pack_mm`) was measured ~10x slower than fp32 with fp32 inputs on this project's
AMD host, and with bf16 inputs no faster than this loop while rounding the activations. Compiled
decoding steps on a CPU read bf16/fp16/fp32 weights through the same loop (`loop_linear`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .sampling import GenerateError

MAX_ROWS = 32  # past this many rows a matmul is bound by arithmetic: dequantized, through F.linear


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (out, in), scale fp32 (out,)): each row symmetric over its largest |value|."""
    w = weight.detach().float()
    top = w.abs().amax(dim=1)
    scale = torch.where(top > 0, top / 127, torch.ones_like(top))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


@torch.compile(dynamic=True)
def _rows_times(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (rows, in) @ w^T in fp32 (float64 for float64 x), reading w (out, in) in its own dtype (int8,
    bf16, fp16): one fused loop, each weight converted in registers (no fp32 copy of w)."""
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.to(wide)[:, None, :] * w.to(wide)).sum(-1)


def _loop(x: torch.Tensor, w: torch.Tensor, what: str) -> torch.Tensor:
    rows = x.numel() // x.size(-1)
    try:
        return _rows_times(x.reshape(rows, x.size(-1)), w)
    except torch._dynamo.exc.BackendCompilerFailed as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GenerateError(f"{what} needs torch.compile's C++ compiler ({first})") from e


def int8_linear(x: torch.Tensor, prepared: tuple, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, q * scale, bias) for `prepared` = (q, scale)."""
    q, scale = prepared
    if x.numel() // x.size(-1) > MAX_ROWS:
        return F.linear(x, dequantize(q, scale), bias)
    y = _loop(x, q, "--weight-dtype int8") * scale
    y = y if bias is None else y + bias
    return y.view(*x.shape[:-1], q.size(0))


def loop_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, w, bias) for one row through the same loop, summed in fp32 (float64 for float64):
    a compiled step's matmuls on a CPU (inductor's own matmul for one row runs on one core: 2x
    slower). More rows through F.linear: the loop converts each weight again for every row."""
    if x.numel() != x.size(-1):
        return F.linear(x, w, bias)
    y = _loop(x, w, f"decoding {w.dtype} weights by the loop").to(x.dtype)
    y = y if bias is None else y + bias
    return y.view(*x.shape[:-1], w.size(0))


def round_to_int8(weights: list[torch.Tensor]) -> None:
    """Each weight (fp32, CPU) replaced in place by its int8 rounding's values (tied ones stay tied)."""
    for w in weights:
        if w.device.type != "cpu" or w.dtype != torch.float32:
            raise GenerateError(
                f"--weight-dtype int8 needs fp32 weights on the CPU (found {w.dtype} on {w.device.type})"
            )
    with torch.no_grad():
        for w in weights:
            w.copy_(dequantize(*quantize_rows(w)))
