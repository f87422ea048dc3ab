"""`gpt2repro bench learn`: tokens (and time) to a loss, AdamW against Muon, on the GPT-2 architecture.

Per model size and a fixed token budget: AdamW (the original recipe) with its LR swept, and Muon with
its LR swept the same way, each over several seeds. The best LR of each is the one with the lowest
mean final validation loss. Reported: the AdamW baseline's final validation loss, the tokens Muon
needs to reach it (validation curves interpolated linearly), their ratio, the seconds per step of
each, and the time ratio; plus a PNG of validation loss against tokens."""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from ..config.presets import train_config
from ..data.prepare import prepare
from ..files import assets
from ..training.plot import read_metrics
from ..training.train import train

LR_FACTORS = (0.5, 1.0, 2.0)


def learn_data(data: str | None) -> Path:
    """`data`, or Tiny Shakespeare + WikiText-2 (when the mirror has it) prepared once into the cache."""
    if data:
        return Path(data)
    sources = [str(assets.fetch("tinyshakespeare.txt"))]
    mirror = assets.mirror_dir()
    if mirror is not None:
        sources += [str(p) for p in sorted((mirror / "wikitext-2").glob("*.txt"))]
    out = assets.cache_dir() / "bench-learn-data"
    prepare(sources, out, shard_tokens=250_000, val_tokens=60_000, progress=False)
    return out


def _run(size: str, data: Path, out: Path, steps: int, seed: int, extra: list[str]) -> dict:
    """One training run; its validation curve (tokens, loss), final loss and median step time."""
    overrides = [
        f"max_steps={steps}",
        f"warmup_steps={max(1, steps // 20)}",
        f"val_every={max(1, steps // 10)}",
        "val_steps=8",
        "hellaswag_every=0",
        "sample_every=0",
        "ckpt_every=0",
        "log_every=0",
        "compile=false",
        f"seed={seed}",
        "resume=never",
        "overwrite=true",
        *extra,
    ]
    cfg = train_config(size, overrides)
    train(cfg, data, out)
    events = read_metrics(out)
    val = [(r["step"] * cfg.total_batch_size, r["loss"]) for r in events["val"]]
    dts = [r["dt"] for r in events["train"]][1:]  # the first step warms up
    return {
        "val": val,
        "final": val[-1][1],
        "step_s": statistics.median(dts),
        "tokens": steps * cfg.total_batch_size,
    }


def tokens_to_reach(curve: list[tuple[int, float]], loss: float) -> float | None:
    """Tokens at which a validation curve first reaches `loss`, interpolated between evaluations."""
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if l1 <= loss:
            return t0 + (t1 - t0) * (l0 - loss) / (l0 - l1) if l0 > loss else float(t0)
    return None


def _sweep(
    size: str, data: Path, work: Path, steps: int, seeds: int, factors: tuple[float, ...], extra0: list[str]
) -> dict:
    """{lr: [run per seed]} for one optimizer (set in `extra0`), its LR swept around its default."""
    base = train_config(size, extra0)
    optimizer = base.optimizer
    key, lr0 = ("max_lr", base.max_lr) if optimizer == "adamw" else ("muon_lr", base.muon_peak_lr)
    sweep = {}
    for factor in factors:
        lr = lr0 * factor
        extra = [*extra0, f"{key}={lr}"]
        sweep[lr] = [
            _run(size, data, work / f"{optimizer}-{lr}-{s}", steps, s + 1, extra) for s in range(seeds)
        ]
    return sweep


def bench_learn(
    sizes: list[str],
    data: str | None,
    steps: int,
    seeds: int,
    plot: str | None,
    overrides: tuple[str, ...] = (),
    recipe: tuple[str, ...] = (),
    factors: tuple[float, ...] = LR_FACTORS,
) -> list[dict]:
    """One row per size (see the module docstring). `overrides` go to every run, `recipe` to the
    Muon runs only (to compare variants of it); `factors` multiply each optimizer's default LR."""
    runs = {"adamw": [*overrides, "optimizer=adamw"], "muon": [*overrides, "optimizer=muon", *recipe]}
    for size in sizes:  # a typo fails now, not after an hour of runs
        for extra in runs.values():
            train_config(size, extra)
    data_dir = learn_data(data)
    rows, curves = [], {}
    with tempfile.TemporaryDirectory() as work:
        for size in sizes:
            best, sweeps = {}, {}
            for optimizer, extra in runs.items():
                sweep = _sweep(size, data_dir, Path(work), steps, seeds, factors, extra)
                finals = {lr: statistics.mean(r["final"] for r in runs) for lr, runs in sweep.items()}
                lr = min(finals, key=finals.get)
                best[optimizer] = (lr, sweep[lr])
                curves[(size, optimizer)] = sweep[lr]
                sweeps[optimizer] = finals
            rows.append({**_compare(size, best), "sweep": sweeps})
    if plot:
        _plot(curves, plot)
    return rows


def _compare(size: str, best: dict) -> dict:
    (adam_lr, adam), (muon_lr, muon) = best["adamw"], best["muon"]
    target = statistics.mean(r["final"] for r in adam)
    reached = [tokens_to_reach(r["val"], target) for r in muon]
    budget = adam[0]["tokens"]
    ratio = statistics.mean(t / budget for t in reached) if all(t is not None for t in reached) else None
    adam_s, muon_s = (statistics.mean(r["step_s"] for r in runs) for runs in (adam, muon))
    return {
        "size": size,
        "adamw_lr": adam_lr,
        "muon_lr": muon_lr,
        "budget_tokens": budget,
        "adamw_final_val": target,
        "muon_final_val": statistics.mean(r["final"] for r in muon),
        "muon_tokens_to_adamw_final": statistics.mean(reached) if ratio is not None else None,
        "token_ratio": ratio,
        "adamw_step_s": adam_s,
        "muon_step_s": muon_s,
        "time_ratio": ratio * muon_s / adam_s if ratio is not None else None,
    }


def _plot(curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({size for size, _ in curves})
    fig, axes = plt.subplots(1, len(sizes), figsize=(7 * len(sizes), 5), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for optimizer in ("adamw", "muon"):
            for i, run in enumerate(curves[(size, optimizer)]):
                tokens, losses = zip(*run["val"])
                color = "C0" if optimizer == "adamw" else "C1"
                ax.plot(tokens, losses, color=color, alpha=0.8, label=optimizer if i == 0 else None)
        ax.set_title(f"{size}: validation loss")
        ax.set_xlabel("tokens")
        ax.set_ylabel("val loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
