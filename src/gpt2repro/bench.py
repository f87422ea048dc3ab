"""`gpt2repro bench`: measured speed, never timed tests. Medians over several runs after warm-up."""

from __future__ import annotations

import functools
import statistics
import time

import torch

# Dense bf16 tensor-core peaks (FLOP/s) for MFU on GPUs; CPUs are measured instead.
GPU_PEAKS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L4": 121e12,
    "4090": 165e12,
    "3090": 71e12,
}


def _median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_flops(dtype: torch.dtype, n: int = 1024, repeats: int = 5, device: str = "cpu") -> float:
    """Median FLOP/s of an n x n x n matmul: the MFU denominator on CPUs."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run():
        for _ in range(4):
            a @ b
        sync()

    return 4 * 2 * n**3 / _median_time(run, repeats)


@functools.lru_cache(maxsize=8)
def device_peak_flops(device: torch.device, dtype: str) -> float | None:
    """Peak FLOP/s for MFU: a table for known GPUs, a quick GEMM measurement on CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peak for key, peak in GPU_PEAKS.items() if key in name), None)
    if device.type == "cpu":
        return gemm_flops(torch.bfloat16 if dtype == "bf16" else torch.float32, repeats=3)
    return None
