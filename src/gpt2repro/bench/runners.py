"""`gpt2repro bench`: measured speed, never timed tests.

Every sub-command prints a table and writes JSON (medians over several runs after warm-up, machine
info, torch version, threads). Yardsticks (`reference.py`) run the same config side by side: a plain
nanoGPT-style model, Hugging Face's GPT2LMHeadModel, the original sampling and one-example-at-a-time
HellaSwag loops, a single-process tokenizer.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..data.prepare import prepare
from ..files import assets
from ..files.fsio import atomic_write_text
from ..model.gpt import GPT
from ..model.precision import autocast, enable_tf32, torch_dtype
from ..parallel.distributed import pick_device
from ..training.heap import ENV, reuse_freed_memory
from ..training.mfu import Peak, best_peak, gemm_flops, host_key, median_time, synchronize
from .chat import bench_chat
from .common import READ_BYTES, BenchError, bench_dtypes, machine_info, read_bandwidth, size_config, table
from .hubserver import bench_streamed_prepare
from .inference import bench_core, bench_generate, bench_hellaswag
from .learn import bench_learn
from .names import BASELINES, TRAIN_MODES, WHAT
from .reference import HFWrapper, RefGPT

PEAK_SIZES = (1024, 2048)


def _bench_serve(size: str, repeats: int, device: torch.device) -> list[dict]:
    """Imported here: it needs the serve extra, which no other benchmark does."""
    from .serving import bench_serve, bench_serve_turns

    return bench_serve(size, repeats, device) + bench_serve_turns(size, repeats, device)


def _bench_generate(size: str, baseline: str, repeats: int, device: torch.device) -> list[dict]:
    """Against llama.cpp: its own table (bench/llamacpp.py, which needs llama-cpp-python, on CPU)."""
    if baseline == "allocator":
        raise BenchError("--baseline allocator compares training steps: use it with `bench train`")
    if baseline != "llama.cpp":
        return bench_generate(size, repeats, device)
    if device.type != "cpu":
        raise BenchError("--baseline llama.cpp compares CPU decoding: run it with --device cpu")
    from .llamacpp import bench_llamacpp

    return bench_llamacpp(size, repeats)


def train_step_runner(
    impl: str, size: str, mode: str, device: torch.device
) -> tuple[Callable[[], None], dict]:
    """One forward + backward + AdamW step of one model implementation in one mode, ready to time;
    and what its row reports besides the time."""
    cfg, B, T = size_config(size)
    torch.manual_seed(0)
    model = {"ours": GPT, "reference": RefGPT, "hf": HFWrapper}[impl](cfg).to(device)
    with torch.device("meta"):  # the same FLOP count for every implementation, no weights allocated
        flops_per_token = GPT(cfg).flops_per_token(T)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=impl == "ours" or device.type == "cuda")
    step_model = torch.compile(model) if mode.startswith("compile") else model
    dtype = "bf16" if mode.endswith("bf16") else "fp32"
    x = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    y = torch.randint(0, cfg.vocab_size, (B, T), device=device)

    def step():
        with autocast(device, dtype):
            _, loss = step_model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize(device)

    for _ in range(3 if mode.startswith("compile") else 1):  # warm-up (compilation)
        step()
    row = {"impl": impl, "size": size, "mode": mode, "B": B, "T": T}
    return step, {**row, "flops_per_token": flops_per_token, "dtype": dtype}


def bench_train_steps(
    runs: list[tuple[str, str]], size: str, repeats: int, device: torch.device
) -> list[dict]:
    """Tokens/s of each (implementation, mode): the medians of `repeats` rounds, each round timing
    one step of every run in turn, so a slow moment of the machine hits all of them alike."""
    steps = [train_step_runner(impl, size, mode, device) for impl, mode in runs]
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for (step, _), seen in zip(steps, times):
            seen.append(median_time(step, 1, warmup=0))
    return [_step_row(info, statistics.median(seen), device) for (_, info), seen in zip(steps, times)]


def _step_row(info: dict, dt: float, device: torch.device) -> dict:
    """A train step's row: `train_step_runner`'s info, its median time, tokens/s and MFU."""
    info = dict(info)
    tok_s = info["B"] * info["T"] / dt
    share = Peak(device, info.pop("dtype")).mfu(info.pop("flops_per_token") * tok_s, 1.0)
    return {**info, "step_s": dt, "tok_per_s": tok_s, "mfu": share}


def bench_prepare(repeats: int, copies: int = 16, streamed: bool = True) -> list[dict]:
    """Tokenization throughput with all cores vs one, on the same documents (WikiText-2 lines as
    documents, `copies` times over); then the same documents streamed from a local hub, with and
    without faults (`streamed`)."""
    mirror = assets.mirror_dir()
    sources = [mirror / "wikitext-2" / "valid.txt", mirror / "wikitext-2" / "test.txt"] if mirror else []
    if not sources or not all(p.is_file() for p in sources):
        sources = [assets.fetch("tinyshakespeare.txt")]
    docs = [
        line for src in sources for line in Path(src).read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "docs.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs * copies))
        counts = tuple(dict.fromkeys((os.cpu_count() or 1, 1)))
        times: dict[int, list[float]] = {w: [] for w in counts}
        tokens = 0
        for i in range(repeats + 1):  # interleaved, so a slow moment hits both; the first is warm-up
            for workers in counts:
                t0 = time.perf_counter()
                out = Path(tempfile.mkdtemp(dir=d))
                # val_tokens=0: a default val split (one 100M shard) would hold all and leave no train split
                tokens = prepare([str(src)], out, val_tokens=0, workers=workers, progress=False)[
                    "total_tokens"
                ]
                if i:
                    times[workers].append(time.perf_counter() - t0)
        for workers in counts:
            dt = statistics.median(times[workers])
            rows.append(
                {
                    "workers": workers,
                    "documents": len(docs) * copies,
                    "tokens": tokens,
                    "s": dt,
                    "tok_per_s": tokens / dt,
                    "speedup": statistics.median(times[1]) / dt,
                }
            )
    return rows + (bench_streamed_prepare(docs * copies, repeats) if streamed else [])


# ---------------------------------------------------------------- command


def bench_memory(size: str) -> list[dict]:
    """Memory of a training step with and without activation checkpointing, each in a fresh process
    (a process's peak memory only grows)."""
    rows = []
    for mode in ("none", "full"):
        code = f"from gpt2repro.bench.common import memory_probe; memory_probe({size!r}, {mode!r})"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.splitlines()[-1]))
    for r in rows:
        r["vs_none"] = r["step_extra_mb"] / rows[0]["step_extra_mb"]
    return rows


def allocator_probe(size: str, modes: tuple[str, ...], heap: bool, steps: int) -> None:
    """Our CPU train step in each mode in this (fresh) process, large tensors from glibc's heap
    (`training.heap`, what training does) or, with heap=False, from glibc's default fresh mappings;
    prints the median step time per mode as JSON."""
    device = torch.device("cpu")
    if heap and not reuse_freed_memory(device):
        raise BenchError("this C library has no mallopt settings to compare (glibc only)")
    results = []
    for mode in modes:
        step, info = train_step_runner("ours", size, mode, device)
        results.append((median_time(step, steps, warmup=1), info))
    print(json.dumps(results))


def bench_allocator(size: str, modes: tuple[str, ...], repeats: int, device: torch.device) -> list[dict]:
    """Our train step with large tensors from the heap against glibc's default, `repeats` rounds of
    two fresh processes each (the setting holds for a process's life), alternating."""
    if device.type != "cpu":
        raise BenchError("--baseline allocator compares CPU memory allocation: run it with --device cpu")
    seen: dict[tuple[str, bool], list[float]] = {}
    infos: dict[str, dict] = {}
    for _ in range(repeats):
        for heap in (False, True):
            code = (
                "from gpt2repro.bench.runners import allocator_probe; "
                f"allocator_probe({size!r}, {modes!r}, {heap}, 3)"
            )
            env = {**os.environ, ENV: "1"}
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
            if out.returncode:
                last = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
                raise BenchError(f"the allocator probe failed: {last}")
            for t, info in json.loads(out.stdout.splitlines()[-1]):
                seen.setdefault((info["mode"], heap), []).append(t)
                infos[info["mode"]] = info
    rows = []
    for (mode, heap), times in seen.items():
        allocator = "heap (training's)" if heap else "glibc default (mmap)"
        rows.append({**_step_row(infos[mode], statistics.median(times), device), "allocator": allocator})
    for r in rows:
        heap_row = next(h for h in rows if h["mode"] == r["mode"] and h["allocator"].startswith("heap"))
        r["vs_heap"] = heap_row["step_s"] / r["step_s"]
    return rows


def bench_peak(repeats: int, device: torch.device) -> list[dict]:
    """GEMM FLOP/s per dtype and size; on a CPU each kept as the host's best if it is (the peak
    training's MFU is against); and the memory's read bandwidth (batch-1 decoding's limit)."""
    rows = []
    for name in bench_dtypes():
        for n in PEAK_SIZES:
            flops = gemm_flops(torch_dtype(name), n, repeats, device.type)
            if device.type == "cpu":
                best_peak(host_key(name, n), flops)
            rows.append({"dtype": name, "n": n, "gflop_per_s": flops / 1e9})
    read = read_bandwidth(repeats, device)
    return rows + [{"dtype": "fp32", "read_bytes": READ_BYTES, "read_gb_per_s": read / 1e9}]


def bench_train(size: str, modes: str, baseline: str, repeats: int, device: torch.device) -> list[dict]:
    """Our train step in each mode, beside the baselines, each row relative to our best mode."""
    native = bench_dtypes()
    chosen = (
        tuple(m for m in TRAIN_MODES if "bf16" in native or "bf16" not in m)
        if modes == "all"
        else tuple(modes.split(","))
    )
    unknown = [m for m in chosen if m not in TRAIN_MODES]
    if unknown:
        raise BenchError(
            f"unknown train mode(s) {', '.join(unknown)}; choose from {', '.join(TRAIN_MODES)} or all"
        )
    if baseline == "llama.cpp":
        raise BenchError("--baseline llama.cpp is a decoding baseline: use it with `bench generate`")
    if baseline == "allocator":
        return bench_allocator(size, chosen, repeats, device)
    impls = ["ours", *BASELINES[baseline]]
    rows = bench_train_steps([(impl, mode) for impl in impls for mode in chosen], size, repeats, device)
    best = max(r["tok_per_s"] for r in rows if r["impl"] == "ours")
    for r in rows:
        r["vs_best_ours"] = r["tok_per_s"] / best
    return rows


def run(
    what: str,
    size: str = "4x256",
    mode: str = "all",
    baseline: str = "none",
    repeats: int = 5,
    json_out: str | None = None,
    learn: dict | None = None,
    device: str = "auto",
) -> dict:
    """Run one benchmark, print its table, and return (and optionally write) the result with machine info.
    `learn`: bench_learn's arguments (sizes, data, steps, seeds, plot, overrides, recipe, factors)."""
    if repeats < 1:
        raise BenchError(f"repeats must be at least 1, got {repeats}")
    if what not in WHAT:
        raise BenchError(f"unknown benchmark {what!r}; choose one of {', '.join(WHAT)}")
    device = pick_device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    enable_tf32(device)
    if what in ("train", "hellaswag", "core"):
        reuse_freed_memory(device)  # as `train` and `eval` run: large tensors reused from the heap
    runners = {
        "peak": lambda: bench_peak(repeats, device),
        "train": lambda: bench_train(size, mode, baseline, repeats, device),
        "generate": lambda: _bench_generate(size, baseline, repeats, device),
        "hellaswag": lambda: bench_hellaswag(size, repeats, device),
        "core": lambda: bench_core(size, repeats, device),
        "prepare": lambda: bench_prepare(repeats),
        "memory": lambda: bench_memory(size),
        "learn": lambda: bench_learn(**(learn or {})),
        "chat": lambda: bench_chat(repeats, device),
        "serve": lambda: _bench_serve(size, repeats, device),
    }
    rows = runners[what]()
    print(table(rows))
    result = {
        "bench": what,
        "args": {
            "size": size,
            "mode": mode,
            "baseline": baseline,
            "repeats": repeats,
            "device": str(device),
            **(learn or {}),
        },
        "machine": machine_info(),
        "results": rows,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if json_out:
        atomic_write_text(json_out, json.dumps(result, indent=2), "the benchmark's results")
    return result
