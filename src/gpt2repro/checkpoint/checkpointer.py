"""The run directory's checkpoints, owned for one run: its lock, where a run starts (the checkpoint
every rank agrees on, `resume`, or a fresh start that never shadows an earlier run), saving, and
setting aside a checkpoint whose weights diverged. The Trainer keeps the loop; the formats are
`gathered` (one process, DDP) and `sharded` (FSDP's DCP shards), `ckptdir` what they share.

What a checkpoint holds beside the weights and the optimizer state is whatever components the loop
passes as `states` (torchtitan's `Stateful`: `state_dict`/`load_state_dict`), each saved under its
own name in state.json; the Checkpointer loops over them and knows none of them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from ..config.schema import TrainConfig
from ..errors import UserError
from ..files.fsio import free_bytes, human_bytes, remove_leftovers, remove_path
from ..files.lock import DirLock, LockError
from ..parallel.distributed import DisagreementError, DistInfo, stop_together
from . import ckptdir, gathered, resume, sharded
from .ckptdir import CheckpointError, all_steps, latest

# Resuming requires these to match the checkpoint: they change the model, which batches come next or
# the optimizer state's layout.
RESUME_KEYS = ("model", "total_batch_size", "micro_batch_size", "seq_len", "seed", "shuffle", "optimizer")


class TrainingError(UserError, RuntimeError):
    """Training cannot continue (non-finite loss, incompatible resume); the message says why."""


class Restored(NamedTuple):
    """Where a run starts: the step, and the checkpoint it resumed from (None: a fresh start)."""

    step: int
    name: str | None


class Checkpointer:
    """One run's checkpoints. `model` and `optimizers` are the run's tensors, written in the format
    the run needs; every other component saves itself (`states`)."""

    def __init__(
        self,
        run_dir: Path,
        cfg: TrainConfig,
        info: DistInfo,
        log: Callable[[str], None],
        model: torch.nn.Module,
        optimizers: list[torch.optim.Optimizer],
    ):
        self.run_dir, self.cfg, self.info, self.log = run_dir, cfg, info, log
        self.model, self.optimizers = model, optimizers

    def restore(self, states: dict[str, Stateful]) -> Restored:
        """Load the checkpoint to resume from into the model, the optimizers, the RNG and each of
        `states` (every rank). With none, a fresh start at step 0, `states` as they are."""
        found = self._find()
        if found is None:
            self._start_fresh()
            return Restored(0, None)
        ckpt, state = found
        saved = gathered.read_config(ckpt)
        diffs = [k for k in RESUME_KEYS if getattr(saved, k) != getattr(self.cfg, k)]
        if diffs:
            raise TrainingError(
                f"cannot resume {ckpt}: config differs in {', '.join(diffs)}; use a new run directory"
            )
        gathered.load_training(ckpt, self.model, self.optimizers, state)
        for name, component in states.items():
            try:
                component.load_state_dict(_entry(state, name))
            except ValueError as e:
                raise TrainingError(f"cannot resume {ckpt}: {e}") from None
        if state["step"] > self.cfg.max_steps:  # before config.json is rewritten with the new value
            raise TrainingError(
                f"cannot resume {ckpt} at step {state['step']} with max_steps={self.cfg.max_steps}: "
                f"set max_steps >= {state['step']}, or use a new run directory"
            )
        return Restored(state["step"], ckpt.name)

    def _find(self) -> tuple[Path, dict] | None:
        """The checkpoint to resume from and its state, the same on every rank (`resume.find`)."""
        try:
            return resume.find(self.run_dir, self.cfg, self.info, self.log)
        except DisagreementError as e:
            raise TrainingError(f"{self.run_dir}: {e}; give every rank the same run directory") from None

    def _start_fresh(self) -> None:
        """Step 0 in a directory that may hold an earlier run: refuse, or with overwrite=true
        remove its checkpoints and logs first (under the run's lock)."""
        earlier = all_steps(self.run_dir)
        if self.cfg.resume == "require":
            raise TrainingError(f"{self.run_dir}: no checkpoint to resume from (resume=require)")
        if not earlier:
            return
        if not self.cfg.overwrite:
            raise TrainingError(
                f"{self.run_dir} holds checkpoints of an earlier run ({earlier[-1].name}) that resume=never "
                "would shadow; resume it (resume=auto), use a new output directory, or pass overwrite=true to delete them"
            )
        if self.info.is_main:
            remove_path(self.run_dir / "checkpoints")  # a link: the link goes, never its target
            for name in ("metrics.jsonl", "samples.txt"):
                (self.run_dir / name).unlink(missing_ok=True)
            self.log(
                f"[gpt2repro] overwrite=true: deleted the earlier run's checkpoints and logs in {self.run_dir}"
            )
        self._barrier()

    def save(self, step: int, states: dict[str, Stateful]) -> None:
        """Checkpoint after `step` steps: the model, the optimizers and each of `states` under its
        name. FSDP on several ranks: every rank writes its own shard (`sharded`); otherwise every
        rank gathers (a no-op without FSDP), rank 0 writes."""
        state = {"world_size": self.info.world_size}
        state.update({name: component.state_dict() for name, component in states.items()})
        if self.cfg.fsdp and self.info.distributed:
            path = sharded.save(self.run_dir, step, self.model, self.optimizers, state, self.cfg, self.info)
        else:
            model_state, optim_state = gathered.gather(self.model, self.optimizers)
            if self.info.is_main:
                path = gathered.save(
                    self.run_dir, step, model_state, optim_state, state, self.cfg, self.cfg.keep_last
                )
        if self.info.is_main:
            self.log(f"[gpt2repro] checkpoint {path}")
        self._barrier()

    def set_aside(self, step: int) -> str:
        """A checkpoint holding weights that diverged is renamed, kept but never resumed from; a note
        for the error message (empty when there was none at that step)."""
        note = ""
        if ckptdir.step_dir(self.run_dir, step).is_dir():
            if self.info.is_main:
                ckptdir.quarantine(self.run_dir, step)
            note = f"; checkpoint step_{step:08d} held these weights and was renamed diverged_step_{step:08d}"
        self._barrier()
        return note

    def warn_about_space(self) -> None:
        """Warn when the disk cannot hold keep_last checkpoints plus the one being written."""
        each, keep = _estimated_bytes(self.model, self.optimizers), self.cfg.keep_last
        free = free_bytes(self.run_dir)
        kept = sum(f.stat().st_size for d in all_steps(self.run_dir) for f in d.iterdir() if f.is_file())
        if free is None or free + kept >= (keep + 1) * each:
            return
        self.log(
            f"[gpt2repro] warning: {self.run_dir}: {human_bytes(free)} free"
            + (f" (and {human_bytes(kept)} in its checkpoints)" if kept else "")
            + f", but keep_last={keep} checkpoints and the one being written take about "
            f"{human_bytes((keep + 1) * each)} ({human_bytes(each)} each); training stops at a "
            "checkpoint that does not fit"
        )

    def _barrier(self) -> None:
        if self.info.distributed:
            dist.barrier()


def _entry(state: dict, name: str) -> dict:
    """A component's entry in state.json. Checkpoints written before components saved themselves
    held the clock's and the loop's keys at the top level: each reads its own from there."""
    return state[name] if name in state else state


def last_good(run_dir: Path) -> str:
    """Which checkpoint a resume would start from, for an error message."""
    try:
        found = latest(run_dir, log=lambda message: None)
    except CheckpointError:
        found = None
    return f"last good checkpoint: {found.name if found else 'none'}"


def _estimated_bytes(model: torch.nn.Module, optimizers: list) -> int:
    """A checkpoint's size before its optimizer state exists: the weights (the tied lm_head once)
    and per parameter AdamW's two moments or Muon's one momentum buffer."""
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    for opt in optimizers:
        buffers = 2 if "betas" in opt.defaults else 1
        size += sum(buffers * p.numel() * p.element_size() for g in opt.param_groups for p in g["params"])
    return size


@contextlib.contextmanager
def run_lock(run_dir: Path, info: DistInfo) -> Iterator[None]:
    """The run directory's writer lock, held by rank 0 for the whole job; every rank learns at once
    whether it was taken, so none is left waiting in a collective for a rank that gave up. The holder
    then removes what a killed earlier writer left half-written."""
    lock = DirLock(run_dir, "train")
    error: Exception | None = None
    if info.is_main:
        try:
            lock.acquire()
        except Exception as e:  # noqa: BLE001 - whatever it is, the other ranks must hear of it
            error = e
    stop_together(
        error,
        info.device,
        LockError(f"{run_dir}: rank 0 could not lock the run directory (its error says why)"),
    )
    try:
        if info.is_main:
            remove_leftovers(run_dir, "config.json")
            remove_leftovers(run_dir / "checkpoints")
        yield
    finally:
        lock.release()
