"""Model FLOPs utilisation: the peak FLOP/s a step is measured against, for training and `bench`.

GPUs: a table of dense bf16 tensor-core peaks. CPUs have no published number that means anything
here, so their peak is measured: the best of several large GEMMs in the same dtype."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch

from .precision import slow_dtype_warning, torch_dtype

# Dense bf16 tensor-core peaks (FLOP/s) for MFU on GPUs.
GPU_PEAKS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L4": 121e12,
    "4090": 165e12,
    "3090": 71e12,
}


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() over `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_flops(
    dtype: torch.dtype, n: int = 1024, repeats: int = 5, device: str = "cpu", best: bool = False
) -> float:
    """FLOP/s of an n x n x n matmul, median (or best) of `repeats`: the MFU denominator on CPUs.
    Its own generator: measuring never moves the training's random state."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, dtype=dtype, device=device, generator=g)
    b = torch.randn(n, n, dtype=dtype, device=device, generator=g)

    def run():
        for _ in range(4):
            a @ b
        synchronize(torch.device(device))

    if best:
        run()
        return max(4 * 2 * n**3 / median_time(run, 1, warmup=0) for _ in range(repeats))
    return 4 * 2 * n**3 / median_time(run, repeats)


@functools.lru_cache(maxsize=8)
def device_peak_flops(device: torch.device, dtype: str) -> float | None:
    """Peak FLOP/s for MFU: the table for known GPUs, a quick GEMM measurement on CPU, else None."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peak for key, peak in GPU_PEAKS.items() if key in name), None)
    if device.type == "cpu":
        # the best of several runs: a peak, robust to a busy moment during the measurement; an
        # emulated dtype (bf16 without native support) is measured small, in seconds, not minutes
        n = 256 if slow_dtype_warning(dtype, device) else 1024
        return gemm_flops(torch_dtype(dtype), n, repeats=7, best=True)
    return None
