"""Model FLOPs utilisation: the peak FLOP/s a step is measured against, for training and `bench`.

GPUs: a table of dense (not 2:4-sparse) peaks per dtype from NVIDIA's datasheets, matched against
the exact model names `torch.cuda.get_device_name` reports; an fp32 run is measured against the
TF32 tensor-core peak on GPUs that have one (training enables TF32), plain fp32 elsewhere. An unknown
GPU gets no MFU rather than a guess. CPUs have no published number that means anything here, so
their peak is measured: the best of several GEMMs in the same dtype at start-up, and the host's best
such measurement is kept in the cache (`peak_flops.json`, keyed by the host's fingerprint; `bench peak`
adds its own), so a start on a busy host is measured against the peak a quiet moment showed, not a
lowered one. A step that runs faster still raises it for the run (`Peak`), so MFU never passes 100%;
the output says which peak a figure is against."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..files import jsonio
from ..files.assets import cache_dir
from ..files.fsio import WriteError, atomic_write_text
from ..files.lock import DirLock, LockError
from ..model.precision import slow_dtype_warning, torch_dtype

PEAK_CACHE = "peak_flops.json"

T = 1e12
# (model-name pattern, {dtype: dense FLOP/s}); "tf32" is what fp32 runs get where it exists.
# Patterns match the name with "NVIDIA "/"Tesla "/"GeForce " removed, in full: "L4" is not "L40S".
GPU_PEAKS: list[tuple[str, dict[str, float]]] = [
    (r"H100( SXM5?)?( \d+GB)?( HBM3e?)?", dict(bf16=989 * T, fp16=989 * T, tf32=495 * T, fp32=67 * T)),
    (r"H100 PCIe( \d+GB)?", dict(bf16=756 * T, fp16=756 * T, tf32=378 * T, fp32=51 * T)),
    (r"H100 NVL( \d+GB)?", dict(bf16=835 * T, fp16=835 * T, tf32=418 * T, fp32=60 * T)),
    (r"H800( \d+GB)?( HBM3)?", dict(bf16=989 * T, fp16=989 * T, tf32=495 * T, fp32=67 * T)),
    (r"H800 PCIe( \d+GB)?", dict(bf16=756 * T, fp16=756 * T, tf32=378 * T, fp32=51 * T)),
    (r"H200( \d+GB)?( HBM3e)?", dict(bf16=989 * T, fp16=989 * T, tf32=495 * T, fp32=67 * T)),
    (r"H200 NVL( \d+GB)?", dict(bf16=835 * T, fp16=835 * T, tf32=418 * T, fp32=60 * T)),
    (r"GH200( \d+GB)?", dict(bf16=989 * T, fp16=989 * T, tf32=495 * T, fp32=67 * T)),
    (r"B200", dict(bf16=2250 * T, fp16=2250 * T, tf32=1100 * T, fp32=75 * T)),
    (r"A100(-SXM4?|-PCIE)?[- ]\d+GB( PCIe)?", dict(bf16=312 * T, fp16=312 * T, tf32=156 * T, fp32=19.5 * T)),
    (r"A800(-SXM4?|-PCIE)?[- ]\d+GB( PCIe)?", dict(bf16=312 * T, fp16=312 * T, tf32=156 * T, fp32=19.5 * T)),
    (r"A10", dict(bf16=125 * T, fp16=125 * T, tf32=62.5 * T, fp32=31.2 * T)),
    (r"L40S", dict(bf16=362 * T, fp16=362 * T, tf32=183 * T, fp32=91.6 * T)),
    (r"L40", dict(bf16=181 * T, fp16=181 * T, tf32=90.5 * T, fp32=90.5 * T)),
    (r"L4", dict(bf16=121 * T, fp16=121 * T, tf32=60 * T, fp32=30.3 * T)),
    (r"RTX A6000", dict(bf16=155 * T, fp16=155 * T, tf32=77.4 * T, fp32=38.7 * T)),
    (r"RTX 4090", dict(bf16=165 * T, fp16=165 * T, tf32=82.6 * T, fp32=82.6 * T)),
    (r"RTX 3090", dict(bf16=71 * T, fp16=71 * T, tf32=35.6 * T, fp32=35.6 * T)),
    (r"V100-SXM2-\d+GB", dict(fp16=125 * T, fp32=15.7 * T)),
    (r"V100-PCIE-\d+GB", dict(fp16=112 * T, fp32=14 * T)),
    (r"T4", dict(fp16=65 * T, fp32=8.1 * T)),
]
_VENDOR = re.compile(r"^(NVIDIA |Tesla |GeForce )+")


def gpu_peak(name: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of the GPU called `name` (as torch reports it) in `dtype` (fp32 runs use
    TF32 where the GPU has it); None for a GPU not in the table or a dtype it lacks."""
    short = _VENDOR.sub("", name.strip())
    for pattern, peaks in GPU_PEAKS:
        if re.fullmatch(pattern, short):
            return peaks.get("tf32", peaks.get("fp32")) if dtype == "fp32" else peaks.get(dtype)
    return None


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


def host_key(dtype: str, n: int) -> str:
    """What a CPU GEMM peak depends on: the CPU (model, flags), its cores, torch's threads and build,
    the dtype and the size."""
    cpu = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = "\n".join(
                re.findall(r"^(?:model name|flags|Features)\s*:.*$", f.read().split("\n\n")[0], re.M)
            )
    parts = [cpu, os.cpu_count(), torch.get_num_threads(), torch.__version__, dtype, n]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def best_peak(key: str, measured: float) -> tuple[float, str]:
    """The host's best GEMM FLOP/s for `key`: `measured` now or the best the cache holds, whichever is
    higher (a busy moment lowers a measurement, never the peak); the cache keeps the best. With
    where it comes from, for the output."""
    path = cache_dir() / PEAK_CACHE
    try:  # one writer at a time: ranks, or `bench peak` beside a run, never lose each other's best
        with DirLock(path, "peak", beside=True, wait=True):
            return _keep_best(path, key, measured)
    except (LockError, WriteError):
        return measured, "the best GEMM measured now (no cache to keep it in)"


def _table(path: Path) -> dict:
    try:
        table = jsonio.loads(path.read_bytes())
    except (OSError, jsonio.NotJSON):
        return {}
    return table if isinstance(table, dict) else {}


def _best(table: dict, key: str) -> dict | None:
    """The cache's entry for `key`, if it is a well-formed one."""
    best = table.get(key)
    return best if isinstance(best, dict) and isinstance(best.get("flops"), float) else None


def _cached(key: str) -> bool:
    return _best(_table(cache_dir() / PEAK_CACHE), key) is not None


def _keep_best(path: Path, key: str, measured: float) -> tuple[float, str]:
    table = _table(path)
    best = _best(table, key)
    if best is not None and best["flops"] >= measured:
        return best[
            "flops"
        ], f"this host's best GEMM, measured {best.get('when')} ({measured / 1e9:,.1f} GFLOP/s now)"
    table[key] = {"flops": float(measured), "when": time.strftime("%Y-%m-%d %H:%M")}
    try:
        atomic_write_text(path, json.dumps(table, indent=1), "the peak FLOP/s cache")
    except WriteError:
        pass  # no cache to keep it in: this measurement alone
    return measured, "the best GEMM measured now, this host's best so far"


@functools.lru_cache(maxsize=8)
def device_peak_flops(device: torch.device, dtype: str) -> tuple[float | None, str]:
    """Peak FLOP/s for MFU and what it is: the table for known GPUs, on CPU the host's best GEMM
    measurement (`best_peak`), else None."""
    if device.type == "cuda":
        return gpu_peak(torch.cuda.get_device_name(device), dtype), "the datasheet's dense peak"
    if device.type == "cpu":
        # the best of several runs: a peak, robust to a busy moment during the measurement; an
        # emulated dtype (bf16 without native support) is measured small, in seconds, not minutes
        n = 256 if slow_dtype_warning(dtype, device) else 1024
        key = host_key(dtype, n)
        repeats = 2 if _cached(key) else 7  # the host's best is known: now a look that may raise it
        return best_peak(key, gemm_flops(torch_dtype(dtype), n, repeats=repeats, best=True))
    return None, "no peak known"


class Peak:
    """The MFU denominator of one run. On a GPU the table's number; on a CPU the host's best GEMM
    measurement, raised to any step's achieved FLOP/s that exceeds it, so MFU never exceeds 1."""

    def __init__(self, device: torch.device, dtype: str, ranks: int = 1):
        peak, self.source = device_peak_flops(device, dtype)
        self.flops = peak * ranks if peak else None
        self.measured = device.type == "cpu"
        self.dtype = dtype

    def describe(self) -> str:
        """Which peak the MFU figures are against."""
        if self.flops is None:
            return "no MFU: no peak FLOP/s known for this device"
        return f"MFU against {self.flops / 1e9:,.1f} GFLOP/s ({self.dtype}): {self.source}"

    def mfu(self, flops: float, seconds: float) -> float | None:
        achieved = flops / seconds
        if self.flops is None:
            return None
        if self.measured and achieved > self.flops:
            self.flops, self.source = achieved, "a step that ran faster than any GEMM measured"
        return achieved / self.flops
