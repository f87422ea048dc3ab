"""What every benchmark shares: the sizes as model configs, which dtypes a machine can time, the
machine's description, the printed table, and the error for a bad benchmark argument; and `bench
memory`'s probe, here so its fresh processes import the model only, not every bench's imports."""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

from ..config.schema import GPTConfig, recompute_interval
from ..errors import UserError
from ..model.gpt import GPT
from ..model.precision import cpu_has_fast_bf16
from ..parallel.distributed import pick_device
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


MEMORY_BATCH = 4  # sequences per step in `bench memory`: enough for activations to dominate


def memory_probe(size: str, checkpointing: str) -> None:
    """One fp32 training step in this (fresh) process; prints its memory use as JSON. CPU: peak RSS
    over the RSS before the step; CUDA: the allocator's peak over its use before the step. Both
    devices: `saved_mb`, the tensors autograd keeps for backward (what checkpointing trades away,
    counted exactly; RSS also depends on how the allocator reuses freed memory)."""
    device = pick_device("auto")
    cfg, _, T = size_config(size)
    B = MEMORY_BATCH
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    model.recompute_interval = recompute_interval(checkpointing)
    x = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    y = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    before = _rss_bytes() if device.type == "cpu" else torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    saved = _step_saving(model, x, y)  # one step: its time, its peak memory, what it saved
    synchronize(device)
    seconds = time.perf_counter() - t0
    peak = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if device.type == "cpu"
        else torch.cuda.max_memory_allocated(device)
    )
    print(
        json.dumps(
            {
                "size": size,
                "activation_checkpointing": checkpointing,
                "B": B,
                "T": T,
                "step_extra_mb": (peak - before) / 2**20,
                "saved_mb": saved / 2**20,
                "peak_mb": peak / 2**20,
                "step_s": seconds,
            }
        )
    )


def _step_saving(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """A training step (forward, backward, gradients zeroed); the bytes of the tensors its forward
    pass keeps for backward (each storage once). The hook keeps no tensor alive longer."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, y)[1].backward()
    model.zero_grad(set_to_none=False)
    return sum(storages.values())


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
