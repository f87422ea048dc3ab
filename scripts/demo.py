#!/usr/bin/env python
"""`make demo`: the whole pipeline at small scale on CPU, with the code path of the 124M run.

Prepares Tiny Shakespeare + WikiText-2 into llm.c shards, trains the `cpu-demo` preset (gradient
accumulation, bf16 autocast where the CPU has it natively, torch.compile) for a bounded time with validation, HellaSwag on the
first 500 examples and samples in the loop, then plots the curves and exports a transformers
directory. Re-running resumes where it stopped."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from gpt2repro import assets
from gpt2repro.checkpoint import load_model
from gpt2repro.data.prepare import prepare
from gpt2repro.hf import export_hf
from gpt2repro.plot import plot_run, read_metrics
from gpt2repro.presets import train_config
from gpt2repro.train import train


def corpus() -> list[str]:
    """Tiny Shakespeare (mirror, cache or its URL, checksummed) plus WikiText-2 when the mirror has it."""
    sources = [str(assets.fetch("tinyshakespeare.txt"))]
    mirror = assets.mirror_dir()
    if mirror is not None:
        sources += [str(p) for p in sorted((mirror / "wikitext-2").glob("*.txt"))]
    return sources


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
    cfg = train_config(
        args.preset, ["compile=true", "hellaswag_limit=500", f"time_limit={args.seconds}", *args.overrides]
    )
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
    print(
        f"   steps trained: {summary['step']}  last val loss: {val.get('loss', float('nan')):.4f}  "
        f"HellaSwag acc_norm (first 500): {hs.get('acc_norm', float('nan')):.4f}"
    )
    print(f"   run (config, checkpoints, metrics.jsonl, samples.txt): {out / 'run'}")
    print(f"   plot: {png}")
    print(f"   transformers export: {hf_dir}")
    print(f"   sample again: .venv/bin/gpt2repro sample --checkpoint {out / 'run'}")
    print(f"   total time: {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
