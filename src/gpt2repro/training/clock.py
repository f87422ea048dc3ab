"""The training clock: how long a run has trained, evaluation, checkpoints and compilation excluded.

It measures the time to a target (`target_val_loss`, `target_core`: "time to GPT-2" counts training
only) and, with `schedule_clock=time`, drives the LR schedule: progress is max(step / max_steps,
training seconds / time_budget), so a host that slows down mid-run still finishes warmup and decay
inside the budget. The step the clock makes the last is decided when its LR is set (after its forward
and backward): it runs at the schedule's end, the floor, and the run stops after it, whatever the
update then takes. Its state goes into every checkpoint, so a resumed run continues the same clock.
The other reasons a run stops early are here too: a signal (`StopFlag`) and the wall-clock limit."""

from __future__ import annotations

import enum
import signal

import torch

from ..config.schema import TrainConfig
from ..parallel.distributed import DistInfo, all_reduce_sum
from .optim import schedule_position


class StopReason(enum.Enum):
    """Why a run ended before max_steps."""

    SIGNAL = "signal"  # preempted: checkpoint at once, no evaluation
    TIME_LIMIT = "time limit"
    TARGET = "target reached"
    SCHEDULE_END = "time budget spent: the schedule is complete"


class StopFlag:
    """SIGTERM/SIGINT set a flag checked after each step, so a preempted run checkpoints cleanly."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class TrainingClock:
    """Seconds of training, and whether the time budget has room for another step."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, device: torch.device):
        self.cfg, self.info, self.device = cfg, info, device
        self.train_seconds = 0.0
        self.last_seconds = 0.0  # the last step's
        self.final = False  # schedule_clock=time: the clock made the last step the run's last

    def state_dict(self) -> dict:
        """The clock's entry in a checkpoint, so a resumed run continues it."""
        return {"train_seconds": self.train_seconds, "last_seconds": self.last_seconds, "final": self.final}

    def load_state_dict(self, state: dict) -> None:
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.last_seconds = float(state.get("last_seconds", 0.0))
        # final only while this budget agrees (a resume with a larger one goes on; a checkpoint from
        # before `final`: the rule it stopped by)
        room = (
            self.cfg.schedule_clock == "time"
            and self.train_seconds + self.last_seconds >= self.cfg.time_budget
        )
        self.final = bool(state.get("final", True)) and room

    def tick(self, seconds: float, compiling: bool) -> None:
        """Count one optimizer step's seconds, unless it compiled the model (compilation is not
        training). Under schedule_clock=time, the ranks' mean: every rank takes the same LR and
        stops at the same step (each rank takes the same branch: no collective is left waiting)."""
        if compiling:
            return
        if self.cfg.schedule_clock == "time" and self.info.distributed:
            seconds = all_reduce_sum([seconds], self.device)[0] / self.info.world_size
        self.last_seconds = seconds
        self.train_seconds += seconds

    def position(self, step: int, elapsed: float = 0.0, compiling: bool = False) -> float:
        """Where the LR schedule is for `step`, `elapsed` seconds into it, in (possibly fractional)
        steps. On the time clock, a step that one more as long would take past time_budget is the
        run's last (`spent`; its length: what it took so far, or the last step's whole length, update
        included, if longer): it runs at the schedule's end (decided here, not after the step, so a
        long update cannot end the run before its decay does; the ranks' mean, as `tick`)."""
        if self.cfg.schedule_clock == "time" and not compiling:
            if self.info.distributed:
                elapsed = all_reduce_sum([elapsed], self.device)[0] / self.info.world_size
            length = max(elapsed, self.last_seconds)  # this step's, its update counted as the last one's
            self.final = self.train_seconds + 2 * length >= self.cfg.time_budget
            if self.final:
                return float(self.cfg.max_steps)
        return schedule_position(step, self.train_seconds, self.cfg)

    def spent(self) -> bool:
        """schedule_clock=time: the step just taken was the last the budget has room for."""
        return self.cfg.schedule_clock == "time" and self.final

    def left(self) -> float | None:
        """Seconds of the budget left (None on the step clock)."""
        return self.cfg.time_budget - self.train_seconds if self.cfg.schedule_clock == "time" else None
