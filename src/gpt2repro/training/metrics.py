"""A run's numbers: what a step's seconds say (`Throughput`: tokens/s, MFU, the ETA, as torchtitan's
`MetricsProcessor` works them out, so the loop only measures) and where they go (`MetricsLogger`:
metrics.jsonl, one JSON object per event, samples.txt, the console, optionally TensorBoard and
Weights & Biases). Only the main rank writes; the others get a logger that does nothing, so the
training loop never asks which rank it is on to log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from ..config.schema import ConfigError, TrainConfig
from ..files.fsio import AppendFile
from .mfu import Peak


class StepStats(NamedTuple):
    """What the loop measured of one optimizer step."""

    loss: float
    lr: float
    grad_norm: float
    dt: float  # its seconds, the update included
    train_seconds: float  # the training clock after it


class Throughput:
    """A step's tokens/s and MFU from its seconds, and the run's time left from the loop's."""

    def __init__(self, cfg: TrainConfig, peak: Peak, flops_per_token: float):
        self.peak, self.tokens, self.max_steps = peak, cfg.total_batch_size, cfg.max_steps
        self.flops = flops_per_token * cfg.total_batch_size  # one step's
        self.started, self.first = 0.0, 0

    def start(self, step: int, now: float) -> None:
        """The loop starts (or resumes) at `step`, at wall time `now`: the ETA counts from here."""
        self.started, self.first = now, step

    def rates(self, step: int, dt: float, now: float, left: float | None) -> dict:
        """tok_per_s, mfu (None without a known peak), eta_s, mfu_peak of `step`, which took `dt`
        seconds; the ETA runs at the loop's pace so far (evaluations included), never past `left`,
        the seconds of a time budget left."""
        mfu = self.peak.mfu(self.flops, dt)  # (a CPU step faster than the peak raises it: first)
        eta = (now - self.started) / (step + 1 - self.first) * (self.max_steps - step - 1)
        eta = eta if left is None else min(eta, left)
        return dict(tok_per_s=self.tokens / dt, mfu=mfu, eta_s=eta, mfu_peak=self.peak.flops)


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg: TrainConfig, enabled: bool):
        self.enabled = enabled
        # whole lines, cut off again when the disk refuses them (a WriteError names the file)
        self.metrics = AppendFile(run_dir / "metrics.jsonl", "metrics") if enabled else None
        self.samples = AppendFile(run_dir / "samples.txt", "samples") if enabled else None
        self.tb = self.wandb = None
        if enabled and cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "tensorboard=true needs the tensorboard package: pip install tensorboard"
                ) from None
            self.tb = SummaryWriter(str(run_dir / "tb"))
        if enabled and cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError("wandb=true needs the wandb package: pip install wandb") from None
            self.wandb = wandb.init(project="gpt2repro", dir=str(run_dir), config=cfg.to_dict())

    def print(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)

    def log(self, event: str, step: int, **values) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps({"event": event, "step": step, **values}) + "\n")
        numbers = {f"{event}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def train_step(self, step: int, stats: StepStats, rates: dict, epoch: int, console: bool) -> None:
        """One optimizer step (`rates`: `Throughput.rates`): always to metrics.jsonl, to the console
        when `console`."""
        self.log("train", step, **stats._asdict(), **rates, epoch=epoch)
        if console:
            mfu = f" | mfu {100 * rates['mfu']:.1f}%" if rates["mfu"] is not None else ""
            self.print(
                f"step {step:6d} | loss {stats.loss:.6f} | lr {stats.lr:.4e} | norm {stats.grad_norm:.4f} | "
                f"dt {1000 * stats.dt:.0f}ms | tok/s {rates['tok_per_s']:,.0f}{mfu} | eta {rates['eta_s'] / 60:.1f}min"
            )

    def sample(self, step: int, texts: list[str]) -> None:
        if not self.enabled:
            return
        for text in texts:
            self.samples.write(f"step {step}: {text!r}\n")
            print(f"  sample: {text!r}")
        self.log("sample", step, texts=texts)

    def close(self) -> None:
        for f in (self.metrics, self.samples):
            if f is not None:
                f.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
