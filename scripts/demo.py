#!/usr/bin/env python
"""`make demo`: the whole pipeline at small scale on CPU, with the code path of the 124M run.

Prepares Tiny Shakespeare + WikiText-2 into llm.c shards, trains the `cpu-demo` preset (gradient
accumulation, bf16 autocast where the CPU has it natively, torch.compile) for a bounded time with
validation, HellaSwag on the first 500 examples and samples in the loop, then plots the curves and
exports a transformers directory. The schedule runs on the time clock (`schedule_clock=time`): if the
host slows down mid-run, warmup and the cosine decay still end inside the budget, in fewer steps.
Re-running resumes where it stopped."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from gpt2repro.checkpoint.gathered import load_model
from gpt2repro.config.presets import train_config
from gpt2repro.data.prepare import prepare
from gpt2repro.files import assets
from gpt2repro.interop.hf import export_hf
from gpt2repro.model.gpt import GPT
from gpt2repro.model.precision import autocast, resolve_dtype
from gpt2repro.training.mfu import median_time
from gpt2repro.training.plot import plot_run, read_metrics
from gpt2repro.training.train import train

# Share of the budget for optimizer steps (the schedule's time_budget); the rest is compilation,
# validation, HellaSwag and samples.
BUDGET_SHARE = 0.7
MIN_STEPS = 20


def corpus() -> list[str]:
    """Tiny Shakespeare (mirror, cache or its URL, checksummed) plus WikiText-2 when the mirror has it."""
    sources = [str(assets.fetch("tinyshakespeare.txt"))]
    mirror = assets.mirror_dir()
    if mirror is not None:
        sources += [str(p) for p in sorted((mirror / "wikitext-2").glob("*.txt"))]
    return sources


def step_seconds(cfg) -> float:
    """One optimizer step of this config on this machine: the median of a few eager steps (torch.compile
    runs as fast or faster on CPU, so the estimate errs towards fewer steps)."""
    model = GPT(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    dtype = resolve_dtype(cfg.dtype, torch.device("cpu"))
    accum = cfg.total_batch_size // (cfg.micro_batch_size * cfg.seq_len)
    x = torch.randint(0, cfg.model.vocab_size, (cfg.micro_batch_size, cfg.seq_len))

    def micro_step() -> None:
        with autocast(torch.device("cpu"), dtype):
            model(x, x)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return median_time(micro_step, repeats=3, warmup=1) * accum


def schedule_steps(cfg, run_dir: Path, seconds: float) -> int:
    """The preset's steps, or as many as fit in the budget at this host's speed now; fixed at the
    run's start (its config.json keeps it). It sets the evaluation intervals; the time clock ends the
    schedule earlier if the host slows down."""
    saved = run_dir / "config.json"
    if saved.is_file():  # resuming: the schedule the run started with
        return json.loads(saved.read_text())["max_steps"]
    fitted = int(BUDGET_SHARE * seconds / step_seconds(cfg))
    steps = max(MIN_STEPS, min(cfg.max_steps, fitted))
    print(f"   schedule: {steps} steps (the preset has {cfg.max_steps}; {fitted} fit in {seconds:.0f}s here)")
    return steps


def scaled_to(steps: int) -> list[str]:
    """The schedule and the evaluation intervals for `steps`, in the CPU presets' proportions."""
    return [
        f"max_steps={steps}",
        f"warmup_steps={max(1, steps // 20)}",
        f"val_every={max(1, steps // 10)}",
        f"hellaswag_every={max(1, steps // 2)}",
        f"sample_every={max(1, steps // 2)}",
        f"ckpt_every={max(1, steps // 4)}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--seconds", type=float, default=480, help="training time budget")
    parser.add_argument(
        "--preset",
        default="cpu-demo",
        choices=("cpu-demo", "cpu-demo-muon"),
        help="cpu-demo-muon: the Muon recipe",
    )
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for the preset")
    args = parser.parse_args()
    out = Path(args.out)
    started = time.time()

    print("== 1/5 prepare: GPT-2 BPE into llm.c shards")
    m = prepare(corpus(), out / "data", shard_tokens=250_000, val_tokens=60_000, progress=False)
    print(f"   {m['total_tokens']:,} tokens from {m['documents']} documents in {len(m['shards'])} shards")

    print(f"== 2/5 train: {args.preset} preset (grad accumulation, autocast dtype auto, compile)")
    clock = ["schedule_clock=time", f"time_budget={BUDGET_SHARE * args.seconds:.0f}"]
    overrides = ["compile=true", "hellaswag_limit=500", *clock, *args.overrides]
    cfg = train_config(args.preset, overrides)
    if not any(o.startswith("max_steps=") for o in args.overrides):
        steps = schedule_steps(cfg, out / "run", args.seconds)
        cfg = train_config(args.preset, [*overrides, *scaled_to(steps)])
    summary = train(cfg, str(out / "data"), str(out / "run"))

    print("== 3/5 plot")
    png = plot_run(out / "run")

    print("== 4/5 export to a transformers directory")
    hf_dir = out / "hf"
    shutil.rmtree(hf_dir, ignore_errors=True)  # generated output: always the latest checkpoint
    export_hf(load_model(out / "run"), hf_dir)

    print("== 5/5 done")
    metrics = read_metrics(out / "run")  # also right when this run only resumed a finished one
    val, hs = metrics.get("val", [{}])[-1], metrics.get("hellaswag", [{}])[-1]
    last = metrics.get("train", [{}])[-1]
    print(
        f"   steps trained: {summary['step']} (last LR {last.get('lr', float('nan')):.3e}, "
        f"{summary.get('train_seconds', 0):.0f}s of training)  last val loss: {val.get('loss', float('nan')):.4f}  "
        f"HellaSwag acc_norm (first 500): {hs.get('acc_norm', float('nan')):.4f}"
    )
    print(f"   run (config, checkpoints, metrics.jsonl, samples.txt): {out / 'run'}")
    print(f"   plot: {png}")
    print(f"   transformers export: {hf_dir}")
    print(f"   sample again: .venv/bin/gpt2repro sample --checkpoint {out / 'run'}")
    print(f"   total time: {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
