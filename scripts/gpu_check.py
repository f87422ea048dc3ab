#!/usr/bin/env python
"""The one-GPU acceptance check: what only a GPU can show, in one command of at most ~8 minutes.

    python scripts/gpu_check.py [--data DIR] [--quick]          # one CUDA GPU (two or more: + DDP/FSDP)
    python scripts/gpu_check.py --device cpu --size tiny        # every code path, on CPU (make test)

Prints a table (check | PASS/FAIL/INFO/SKIP | detail) and exits 1 when any check fails. The GPU
thresholds (MFU, tolerances) have not yet been verified on a GPU: see README."""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gpt2repro.checkpoint import ckptdir
from gpt2repro.config.schema import model_config
from gpt2repro.data.loader import DataLoader
from gpt2repro.data.shards import shard_name, write_shard
from gpt2repro.evals import hellaswag
from gpt2repro.generation.generate import generate
from gpt2repro.generation.sampling import GREEDY
from gpt2repro.model import precision
from gpt2repro.model.gpt import GPT
from gpt2repro.model.ops import linear_cross_entropy
from gpt2repro.training import mfu

# model preset, micro-batch, sequence length, steps of the throughput/learning loop, peak LR
SIZES = {"124m": ("gpt2", 32, 1024, 50, 6e-4), "tiny": ("tiny", 4, 64, 40, 3e-3)}
# the smaller runs (resume, ranks) through `gpt2repro train`: preset, overrides, micro-batch x sequence
RUNS = {
    "124m": ("gpt2-124m-10B", [], (8, 1024)),
    "tiny": ("cpu-tiny", ["model.n_layer=2", "model.n_head=2", "model.n_embd=64"], (4, 32)),
}
COMMON = ["val_every=0", "hellaswag_every=0", "sample_every=0", "log_every=0", "verify_data=false"]
COMMON += ["compile=false", "warmup_steps=2", "max_lr=1e-3"]
MIN_MFU_124M = 0.35  # the llm.c reference reaches ~0.6 on an A100 at this size
REFERENCE = "llm.c: ~60% MFU, A100, 124M"


class Report:
    def __init__(self):
        self.rows: list[tuple[str, str, str]] = []

    def add(self, check: str, ok: bool | None, detail: str) -> None:
        status = "INFO" if ok is None else ("PASS" if ok else "FAIL")
        self.rows.append((check, status, detail))
        print(f"| {check} | {status} | {detail} |", flush=True)

    def run(self, check: str, fn) -> None:
        """A check that raises is a failure with its one-line reason, and the others still run. Each
        check's time goes to stderr (where this script's own minutes go)."""
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 (report, do not stop)
            self.add(check, False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        print(f"[gpu_check] {check}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)

    @property
    def failed(self) -> bool:
        return any(status == "FAIL" for _, status, _ in self.rows)


def random_shards(out: Path, tokens: int = 400_000) -> Path:
    """Uniformly random tokens as val and train shards: loss at init must be ln(V) there."""
    rng = np.random.default_rng(0)
    for split, index in (("val", 0), ("train", 1)):
        write_shard(out / shard_name(split, index), rng.integers(0, 50257, tokens, dtype=np.int64))
    return out


def check_environment(rep: Report, device: torch.device, dtype: str) -> None:
    rep.add("torch", None, f"{torch.__version__}, device {device}")
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        rep.add("gpu", None, f"{torch.cuda.get_device_name(device)}, compute capability {cap[0]}.{cap[1]}")
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        native = precision.cpu_has_fast_bf16()
        rep.add("cpu", None, f"kernels {torch.backends.cpu.get_cpu_capability()}")
    rep.add("native bf16", None, f"{native}; training dtype (auto) {dtype}")


def check_compile_graphs(rep: Report, model: GPT, x: torch.Tensor, y: torch.Tensor, dtype: str) -> None:
    torch._dynamo.reset()
    with precision.autocast(x.device, dtype):
        explained = torch._dynamo.explain(lambda a, b: model(a, b)[1])(x, y)
    ok = explained.graph_count == 1 and explained.graph_break_count == 0
    rep.add("compile graphs", ok, f"{explained.graph_count} graph(s), {explained.graph_break_count} break(s)")


def check_flash(rep: Report, model: GPT, device: torch.device, T: int) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = model.config
    shape = (2, cfg.n_head, T, cfg.n_embd // cfg.n_head)
    q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        F.scaled_dot_product_attention(q, k, v, is_causal=True).float().sum().backward()
    rep.add(
        "flash attention (bf16, fwd+bwd)",
        q.grad is not None and bool(torch.isfinite(q.grad).all()),
        str(shape),
    )


def check_fused_loss(rep: Report, model: GPT, x: torch.Tensor, y: torch.Tensor, dtype: str) -> None:
    """Our fused lm_head + cross-entropy against the plain one on the same tokens and weights."""
    grads = []
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        with precision.autocast(x.device, dtype):
            h = model.hidden(x)
            if fused:
                loss = linear_cross_entropy(
                    h.flatten(0, 1), model.lm_head.weight, y.flatten(), model.config.vocab_size
                )
            else:
                loss = F.cross_entropy(model.logits(h).flatten(0, 1).float(), y.flatten())
        loss.backward()
        grads.append((loss.item(), torch.cat([p.grad.flatten().float() for p in model.parameters()])))
    (a, ga), (b, gb) = grads
    cosine = F.cosine_similarity(ga, gb, dim=0).item()
    ok = abs(a - b) <= 2e-3 * abs(b) and cosine >= 0.999
    rep.add("fused vs unfused loss", ok, f"{dtype}: loss {a:.5f} vs {b:.5f}, gradient cosine {cosine:.6f}")
    model.zero_grad(set_to_none=True)


def check_fp16(rep: Report, device: torch.device) -> None:
    """A target ~25 nats below the others: fp16's softmax would underflow, the loss must not."""
    torch.manual_seed(0)
    h, w, t = (
        torch.randn(64, 32, device=device),
        torch.randn(70, 32, device=device) * 0.05,
        torch.randperm(64, device=device),
    )
    w[t] -= 25 * h / h.norm(dim=1, keepdim=True) ** 2
    with torch.autocast(device.type, dtype=torch.float16):
        loss = linear_cross_entropy(h, w, t, 64).item()
    ref = F.cross_entropy(h.double() @ w[:64].double().t(), t).item()
    rep.add(
        "fp16 loss on a confident wrong target",
        math.isfinite(loss) and abs(loss - ref) <= 2e-3 * ref,
        f"{loss:.4f} (float64: {ref:.4f})",
    )


def train_loop(rep: Report, model: GPT, loader: DataLoader, args, dtype: str, real_data: bool) -> None:
    """Compiled training at this size: recompiles, throughput and MFU, and whether it learns."""
    import torch._dynamo.utils as dynamo_utils

    _, B, T, steps, lr = SIZES[args.size]
    compiled = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, fused=True)
    peak = mfu.Peak(loader.device, dtype)
    flops = model.flops_per_token(T) * B * T
    losses, times, frames = [], [], []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 10)
        x, y = loader.next_batch()
        t0 = time.perf_counter()
        with precision.autocast(loader.device, dtype):
            loss = compiled(x, y)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mfu.synchronize(loader.device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if step in (0, steps - 1):  # an evaluation pass, as validation does in the loop
            compiled.eval()
            with torch.no_grad(), precision.autocast(loader.device, dtype):
                compiled(x, y)
            compiled.train()
            frames.append(dynamo_utils.counters["frames"]["total"])
    rep.add(
        "recompiles after the first train and eval steps",
        frames[0] == frames[-1],
        f"{frames[-1] - frames[0]} ({frames[0]} frames compiled at step 0)",
    )
    dt = statistics.median(times[3:])
    share = peak.mfu(flops, dt)
    ok = 0 < (share or 0) <= 1 and (
        args.size != "124m" or loader.device.type != "cuda" or share >= MIN_MFU_124M
    )
    share_text = "n/a" if share is None else f"{100 * share:.1f}%"
    rep.add("throughput", ok, f"{B * T / dt:,.0f} tok/s, MFU {share_text} ({REFERENCE})")
    if real_data:
        fall = losses[0] - min(losses[-5:])
        rep.add(
            "learning (real shards)",
            fall >= 3,
            f"loss {losses[0]:.3f} -> {min(losses[-5:]):.3f} in {steps} steps",
        )
    else:
        ln_v = math.log(50257)
        rep.add(
            "loss at init on random tokens",
            abs(losses[0] - ln_v) < 0.5,
            f"{losses[0]:.3f} vs ln V = {ln_v:.3f}",
        )


def check_hellaswag(rep: Report, model: GPT, device: torch.device, dtype: str, limit: int | None) -> None:
    examples = hellaswag.load_examples(limit=limit)
    t0 = time.perf_counter()
    result = hellaswag.evaluate(model, examples, "completion", device, dtype=dtype)
    mfu.synchronize(device)
    seconds = time.perf_counter() - t0
    ok = result["n"] == len(examples) and 0 <= result["acc_norm"] <= 1
    rep.add(
        "hellaswag",
        ok,
        f"{result['n']} examples in {seconds:.1f}s ({result['n'] / seconds:.0f}/s), acc_norm {result['acc_norm']:.4f}",
    )


def check_generation(rep: Report, model: GPT, device: torch.device, new_tokens: int) -> None:
    model.eval()
    rates = []
    for batch in (1, 8):
        prompt = torch.randint(0, 50257, (batch, 8), device=device)
        generate(model, prompt, 4, sampling=GREEDY)  # warm-up
        t0 = time.perf_counter()
        generate(model, prompt, new_tokens, sampling=GREEDY)
        mfu.synchronize(device)
        rates.append(f"B={batch}: {batch * new_tokens / (time.perf_counter() - t0):,.0f} tok/s")
    rep.add("generation (KV cache, greedy)", None, ", ".join(rates))
    tf32 = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # exact fp32, so cached and recomputed agree
    try:
        prompt = torch.randint(0, 50257, (2, 8), device=device)
        same = torch.equal(
            generate(model, prompt, 24, sampling=GREEDY),
            generate(model, prompt, 24, sampling=GREEDY, use_cache=False),
        )
    finally:
        torch.set_float32_matmul_precision(tf32)
    rep.add("KV cache greedy = recompute greedy", same, "24 tokens, B=2, fp32")
    model.train()


def _train_cli(args, data: Path, out: Path, extra: list[str], nproc: int = 0) -> str:
    """`gpt2repro train` of the small run; under torchrun with `nproc` ranks, else in this process."""
    preset, overrides, (micro, seq) = RUNS[args.size]
    batch = [f"micro_batch_size={micro}", f"seq_len={seq}", f"total_batch_size={micro * seq * max(nproc, 1)}"]
    cmd = ["train", "--preset", preset, "--data", str(data), "--out", str(out)]
    cmd += [*overrides, *batch, *COMMON, f"device={args.device}", *extra]
    if not nproc:
        return _train_here(cmd)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*launcher, "-m", "gpt2repro", *cmd], capture_output=True, text=True, env=env, timeout=900
    )
    if proc.returncode:
        raise RuntimeError((proc.stderr or proc.stdout).strip().splitlines()[-1])
    return proc.stdout


def _train_here(argv: list[str]) -> str:
    """The CLI's `main` in this process, its stdout returned: a process of its own would start Python
    and torch again (~3 s a run; four runs here). Each run seeds itself and reads its checkpoints
    from disk, as a new process would."""
    import contextlib
    import io

    from gpt2repro.cli import main as cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli(argv)
        except SystemExit as e:  # argparse's errors
            code = e.code
    if code:
        raise RuntimeError(((err.getvalue() or out.getvalue()).strip().splitlines() or ["no output"])[-1])
    return out.getvalue()


def _losses(run: Path) -> dict[int, float]:
    """Each step's loss (the last one logged: a resumed run logs the steps after its checkpoint again)."""
    import json

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["event"] == "train"}


def _close(a: dict[int, float], b: dict[int, float], rel: float = 1e-3) -> tuple[bool, float]:
    worst = max(abs(a[s] - b[s]) / abs(b[s]) for s in b) if a.keys() == b.keys() and a else math.inf
    return worst <= rel, worst


def check_resume(rep: Report, args, data: Path, work: Path) -> None:
    """12 steps with a checkpoint at 6; then the run's copy without the step-12 checkpoint resumes."""
    straight, split = work / "straight", work / "split"
    header = _train_cli(args, data, straight, ["max_steps=12", "ckpt_every=6", "keep_last=2"])
    tf32 = "tf32 on" in header
    rep.add(
        "TF32 matmuls in training",
        tf32 or args.device == "cpu",
        f"trainer reports tf32 {'on' if tf32 else 'off'}",
    )
    shutil.copytree(straight, split)
    shutil.rmtree(split / "checkpoints" / "step_00000012")
    (split / "checkpoints" / "latest").unlink()
    out = _train_cli(args, data, split, ["max_steps=12", "ckpt_every=6", "keep_last=2", "--resume"])
    resumed = "resumed from step_00000006" in out
    ok, worst = _close(_losses(split), _losses(straight))
    rep.add("resume: 6 + 6 steps = 12 straight", ok and resumed, f"worst relative difference {worst:.2e}")


def check_ranks(rep: Report, args, data: Path, work: Path) -> None:
    ranks = 2 if args.device == "cpu" else min(torch.cuda.device_count(), 8)
    if ranks < 2:
        rep.add("DDP / FSDP", None, "SKIP: needs 2+ GPUs")
        return
    micro, seq = RUNS[args.size][2]
    steps = ["max_steps=4"]
    _train_cli(args, data, work / "one", [*steps, f"total_batch_size={micro * seq * ranks}"])
    _train_cli(args, data, work / "ddp", steps, nproc=ranks)
    ok, worst = _close(_losses(work / "ddp"), _losses(work / "one"))
    rep.add(f"DDP x{ranks} = one process", ok, f"worst relative difference {worst:.2e}")
    evals = [
        "fsdp=true",
        "hellaswag_every=2",
        "hellaswag_limit=16",
        "sample_every=2",
        "sample_count=1",
        "sample_tokens=4",
    ]
    # compiled per block (on GPUs: on CPU tests/test_fsdp.py compiles FSDP's blocks, and two ranks
    # compiling on 2 cores would double this check's time), and in bf16 (auto on a GPU) gathering bf16
    # weights, reducing fp32 gradients; a sharded checkpoint (a shard per rank) at steps 2 and 4
    compiled = args.device != "cpu"
    fsdp = [*steps, *evals, f"compile={str(compiled).lower()}", "ckpt_every=2"]
    header = _train_cli(args, data, work / "fsdp", fsdp, nproc=ranks)
    ok, worst = _close(_losses(work / "fsdp"), _losses(work / "ddp"))
    dtype = header.split("| dtype ")[1].split(" ")[0] if "| dtype " in header else "?"
    rep.add(
        f"FSDP x{ranks} ({dtype}{', blocks compiled' if compiled else ''}) = DDP, in-loop HellaSwag and sampling",
        ok and (work / "fsdp" / "samples.txt").is_file(),
        f"worst relative difference {worst:.2e}; hellaswag/samples every 2",
    )
    rep.run(SHARDED, lambda: check_sharded_resume(rep, args, data, work, ranks))


SHARDED = "FSDP sharded checkpoint resumed on 1 process = FSDP"


def check_sharded_resume(rep: Report, args, data: Path, work: Path, ranks: int) -> None:
    """The FSDP run's step-2 checkpoint (a shard per rank) continued by one process with the same
    global batch, DCP resharding on load; then `gpt2repro verify` of both runs."""
    micro, seq = RUNS[args.size][2]
    resumed = work / "fsdp-resumed"
    shutil.copytree(work / "fsdp", resumed, ignore=shutil.ignore_patterns("step_00000004", "latest"))
    shards = len(list((resumed / "checkpoints" / "step_00000002").glob("shard-*.safetensors")))
    extra = ["fsdp=true", "max_steps=4", "ckpt_every=2", f"total_batch_size={micro * seq * ranks}"]
    out = _train_cli(args, data, resumed, [*extra, "--resume"])
    ok, worst = _close(_losses(resumed), _losses(work / "fsdp"))
    verified = [_verify(run) for run in (work / "fsdp", resumed)]
    rep.add(
        SHARDED,
        ok and shards == ranks and "resumed from step_00000002" in out and all(verified),
        f"{shards} shards -> 1 process: worst relative difference {worst:.2e}; "
        f"verify {'ok' if all(verified) else 'FAILED'}",
    )


def _verify(run: Path) -> bool:
    """What `gpt2repro verify RUN` checks passes: every checkpoint's files match its manifest."""
    checked, problems = ckptdir.verify_run(run)
    return checked > 0 and not problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="124m", choices=SIZES)
    parser.add_argument(
        "--data", default=None, help="shards made by `gpt2repro prepare` (default: random tokens)"
    )
    parser.add_argument("--quick", action="store_true", help="HellaSwag on the first 500 examples")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available here; use --device cpu --size tiny for the CPU run")
    dtype = precision.resolve_dtype("auto", device)
    precision.enable_tf32(device)
    rep = Report()
    print("| check | status | detail |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = Path(args.data) if args.data else random_shards(work / "data")
        _run_checks(rep, args, device, dtype, data, work)
    print(
        f"\n{'FAILED' if rep.failed else 'all checks passed'} ({sum(s == 'FAIL' for _, s, _ in rep.rows)} failed)"
    )
    return 1 if rep.failed else 0


def _run_checks(rep: Report, args, device: torch.device, dtype: str, data: Path, work: Path) -> None:
    preset, B, T, _, _ = SIZES[args.size]
    check_environment(rep, device, dtype)
    torch.manual_seed(0)
    model = GPT(model_config(preset, vocab_multiple=64, block_size=max(T, 64))).to(device)
    loader = DataLoader(data, "train", B, T, device=device, vocab_size=50257)
    x, y = loader.next_batch()
    rep.run("compile graphs", lambda: check_compile_graphs(rep, model, x[:2], y[:2], dtype))
    rep.run("flash attention (bf16, fwd+bwd)", lambda: check_flash(rep, model, device, T))
    rep.run("fused vs unfused loss", lambda: check_fused_loss(rep, model, x, y, dtype))
    rep.run("fp16 loss on a confident wrong target", lambda: check_fp16(rep, device))
    rep.run("throughput", lambda: train_loop(rep, model, loader, args, dtype, args.data is not None))
    limit = 64 if args.size == "tiny" else 500 if args.quick else None
    rep.run("hellaswag", lambda: check_hellaswag(rep, model, device, dtype, limit))
    rep.run("generation", lambda: check_generation(rep, model, device, 64 if args.size == "124m" else 16))
    rep.run("resume: 6 + 6 steps = 12 straight", lambda: check_resume(rep, args, data, work))
    rep.run("DDP / FSDP", lambda: check_ranks(rep, args, data, work))


if __name__ == "__main__":
    sys.exit(main())
