"""What every benchmark shares: the sizes as model configs, which dtypes a machine can time, the
machine's description, the printed table, and the error for a bad benchmark argument."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from ..config.schema import GPTConfig
from ..errors import UserError
from ..model.precision import cpu_has_fast_bf16
from ..training.mfu import median_time, synchronize
from .names import SIZES

READ_BYTES = 1 << 30  # the buffer `read_bandwidth` streams: far larger than any CPU's caches


def bench_dtypes() -> tuple[str, ...]:
    """bf16 rows only where bf16 matmuls are native: elsewhere they would time an emulation
    hundreds of times slower than fp32 (and take hours)."""
    return ("fp32", "bf16") if torch.cuda.is_available() or cpu_has_fast_bf16() else ("fp32",)


def read_bandwidth(repeats: int, device: torch.device) -> float:
    """Bytes/s of a streaming read (a sum) of a 1 GiB fp32 buffer on the run's threads, the best of
    `repeats`: the memory's limit, against which batch-1 decoding (every weight read once per token)
    is measured."""
    x = torch.ones(READ_BYTES // 4, device=device)

    def run():
        x.sum()
        synchronize(device)

    run()
    return READ_BYTES / min(median_time(run, 1, warmup=0) for _ in range(repeats))


class BenchError(UserError, ValueError):
    """A bad benchmark name, mode or count; the message says which."""


def machine_info() -> dict:
    return {
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def size_config(size: str) -> tuple[GPTConfig, int, int]:
    L, d, h, B, T = SIZES[size]
    return (
        GPTConfig(n_layer=L, n_embd=d, n_head=h, block_size=max(T, 256), vocab_size=50257, vocab_multiple=64),
        B,
        T,
    )


def table(rows: list[dict]) -> str:
    """Rows as aligned columns; nested results (dicts) are for the JSON only."""
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, dict)))  # every kind

    def fmt(v):
        if v is None:  # a column another kind of row has
            return ""
        if isinstance(v, float):
            return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    widths = {k: max(len(k), *(len(fmt(r.get(k))) for r in rows)) for k in keys}
    lines = ["  ".join(k.ljust(widths[k]) for k in keys)]
    lines += ["  ".join(fmt(r.get(k)).ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)
