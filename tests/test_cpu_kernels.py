"""The one-row C++ kernels compiled steps decode through on AVX-512 CPUs (generation/cpu_kernels.py):
bf16 and fp32 against float64 products of the same values, at widths with and without a tail; the
switch back to inductor's loop. (int8's VNNI kernel: tests/test_int8.py.)"""

from __future__ import annotations

import pytest
import torch

from gpt2repro.generation import cpu_kernels


def _need(name: str) -> None:
    if name not in cpu_kernels.available():
        pytest.skip(f"this CPU lacks {sorted(cpu_kernels.NEEDS[name])}: decoding uses the loop (tested)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("in_features", [768, 3072, 70, 5])
@pytest.mark.parametrize("bias", [True, False])
def test_a_kernel_is_its_dtypes_values_multiplied_in_float64(dtype, in_features, bias):
    """Exact products of the stored values summed in fp32: within fp32 rounding of float64."""
    _need({torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype])
    torch.manual_seed(0)
    w = (torch.randn(100, in_features) * torch.logspace(-2, 1, 100)[:, None]).to(dtype)
    x, b = torch.randn(1, 1, in_features).to(dtype), (torch.randn(100).to(dtype) if bias else None)
    got = cpu_kernels.loop_linear(x, w, b)
    sums = x.double().view(1, -1) @ w.double().T
    exact = (sums.to(dtype) + (0 if b is None else b)).view(1, 1, 100)  # rounded, then the bias, as F.linear
    assert got.shape == (1, 1, 100) and got.dtype == dtype
    tolerance = sums.abs().max().item() * (1e-5 if dtype == torch.float32 else 2**-7)
    torch.testing.assert_close(got.double(), exact.double(), rtol=0, atol=tolerance)
    raw = getattr(torch.ops.gpt2repro, f"{'bf16' if dtype == torch.bfloat16 else 'fp32'}_linear")(
        x.view(1, -1), w
    )
    torch.testing.assert_close(raw.double(), sums, rtol=0, atol=1e-5 * sums.abs().max().item())


def test_the_loop_is_used_where_the_kernels_are_switched_off(monkeypatch):
    monkeypatch.setenv("GPT2REPRO_CPU_KERNELS", "loop")
    assert cpu_kernels._cpu_flags() == set()
    monkeypatch.setattr(cpu_kernels, "_FOUND", [])
    assert cpu_kernels.available() == frozenset()
    w, x = torch.randn(8, 40), torch.randn(1, 40)
    torch.testing.assert_close(cpu_kernels.loop_linear(x, w, None), x @ w.T, rtol=1e-6, atol=1e-6)
