"""Int8 weights for decoding (`--weight-dtype int8`): batch-1 decoding reads every weight once per
token, so a quarter of fp32's bytes is the one large step left on a CPU (benchmarks/RESULTS.md).

Each Linear weight row (output feature) is rounded to 127 steps of its largest |value|, symmetric:
w ≈ q * scale, q in int8, |w - q * scale| <= scale / 2. The model keeps those values, dequantized,
in its fp32 weights, so its forward (the prompt, the reference) computes with exactly what the
decoding steps read as int8; the tied embedding looks its rows up there too.

The decoding matmul reads the int8 rows and their scales through `cpu_kernels`: where the CPU has
AVX-512 VNNI, a C++ kernel that rounds each row of activations to int8 per block of 32 (as
llama.cpp's q8_0 does) and sums the products in int32; elsewhere one compiled loop in fp32.
torch's own CPU kernel (`torch._weight_int8pack_mm`) was measured ~10x slower than fp32 with fp32
inputs on this project's AMD host, and with bf16 inputs no faster than the loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_kernels
from .sampling import GenerateError

MAX_ROWS = 32  # past this many rows a matmul is bound by arithmetic: dequantized, through F.linear


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (out, in), scale fp32 (out,)): each row symmetric over its largest |value|."""
    w = weight.detach().float()
    top = w.abs().amax(dim=1)
    scale = torch.where(top > 0, top / 127, torch.ones_like(top))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def prepare_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows`, after finding the kernel that will read them (before any compiled step
    traces `int8_linear`)."""
    cpu_kernels.vnni()
    return quantize_rows(weight)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def int8_linear(x: torch.Tensor, prepared: tuple, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, q * scale, bias) for `prepared` = (q, scale); x rounded as
    `cpu_kernels.round_activations` where the VNNI kernel runs (fp32 x on a VNNI CPU)."""
    q, scale = prepared
    rows = x.numel() // x.size(-1)
    if rows > MAX_ROWS:
        return F.linear(x, dequantize(q, scale), bias)
    if x.dtype == torch.float32 and cpu_kernels.vnni():
        y = torch.ops.gpt2repro.int8_linear(x.reshape(rows, x.size(-1)).contiguous(), q, scale, bias)
    else:
        y = cpu_kernels.loop(x, q, "--weight-dtype int8") * scale
        y = y if bias is None else y + bias
    return y.view(*x.shape[:-1], q.size(0))


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
