"""`gpt2repro plot RUN_DIR`: train/val loss, HellaSwag and (when measured) CORE curves from
metrics.jsonl, with the reference lines of the original run: HellaSwag scores always (the same
benchmark), OpenAI GPT-2 124M's val loss only when the run's data came from FineWeb (a loss on other
text is not comparable), and nanochat's CORE of each GPT-2 size."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserError
from ..evals.core_data import GPT2_CORE
from ..files.fsio import atomic_write

GPT2_124M_VAL_LOSS = 3.2924
GPT2_124M_HELLASWAG = 0.2955
GPT3_124M_HELLASWAG = 0.337


class PlotError(UserError, ValueError):
    """A run directory without readable metrics; the message names the file."""


def read_metrics(run_dir: str | os.PathLike) -> dict[str, list[dict]]:
    """Events of metrics.jsonl by kind. A torn last line (a kill -9 mid-write) is left out; any
    other unreadable line is an error naming it."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path}: no metrics (is this a run directory?)")
    lines = [
        (n, line) for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()
    ]
    events: dict[str, list[dict]] = {}
    for i, (lineno, line) in enumerate(lines):
        try:
            row = json.loads(line)
            kind = row["event"]
            if not isinstance(kind, str) or not isinstance(row["step"], int):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            if i == len(lines) - 1 and i > 0:
                continue
            raise PlotError(f"{path}:{lineno}: not a metrics record") from None
        events.setdefault(kind, []).append(row)
    if not events:
        raise PlotError(f"{path}: no metrics recorded yet")
    # after a resume the same steps may appear twice: keep the latest value of each step
    return {k: list({r["step"]: r for r in rows}.values()) for k, rows in events.items()}


def loss_references(events: dict[str, list[dict]]) -> list[tuple[float, str]]:
    """The loss plot's reference lines: GPT-2 124M's val loss when the run's data was prepared from
    FineWeb or FineWeb-EDU (its `data` events say what from), none on other text."""
    sources = [s for r in events.get("data", []) for s in r.get("sources", []) if isinstance(s, str)]
    if any("fineweb" in s.lower() for s in sources):
        return [(GPT2_124M_VAL_LOSS, f"OpenAI GPT-2 (124M) val on FineWeb-EDU ({GPT2_124M_VAL_LOSS})")]
    return []


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = read_metrics(run_dir)
    out = Path(out) if out else Path(run_dir) / "curves.png"
    core = events.get("core", [])
    fig, axes = plt.subplots(1, 3 if core else 2, figsize=(21 if core else 14, 5))
    ax1, ax2 = axes[:2]
    train, val = events.get("train", []), events.get("val", [])
    if train:
        ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", alpha=0.7)
    if val:
        ax1.plot([r["step"] for r in val], [r["loss"] for r in val], label="val loss", marker="o")
    for value, label in loss_references(events):
        ax1.axhline(value, color="r", linestyle="--", label=label)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.set_title("loss")
    ax1.legend()
    hs = events.get("hellaswag", [])
    if hs:
        ax2.plot([r["step"] for r in hs], [r["acc_norm"] for r in hs], label="ours (acc_norm)", marker="o")
    ax2.axhline(
        GPT2_124M_HELLASWAG,
        color="r",
        linestyle="--",
        label=f"OpenAI GPT-2 (124M) HellaSwag ({GPT2_124M_HELLASWAG})",
    )
    ax2.axhline(
        GPT3_124M_HELLASWAG,
        color="g",
        linestyle="--",
        label=f"OpenAI GPT-3 (124M) HellaSwag ({GPT3_124M_HELLASWAG})",
    )
    ax2.set_xlabel("step")
    ax2.set_ylabel("accuracy")
    ax2.set_title("HellaSwag")
    ax2.legend()
    if core:
        _plot_core(axes[2], core)
    fig.tight_layout()
    # atomically: a reader (or a full disk) never sees half a picture
    atomic_write(out, lambda f: fig.savefig(f, format=out.suffix[1:] or "png", dpi=100), "the plot")
    plt.close(fig)
    return out


def _plot_core(ax, rows: list[dict]) -> None:
    ax.plot([r["step"] for r in rows], [r["core"] for r in rows], label="ours", marker="o")
    for (size, score), color in zip(GPT2_CORE.items(), ("r", "m", "g", "k")):
        ax.axhline(score, color=color, linestyle="--", label=f"OpenAI GPT-2 {size} ({score})")
    ax.set_xlabel("step")
    ax.set_ylabel("CORE (mean centered accuracy)")
    ax.set_title("CORE")
    ax.legend()
