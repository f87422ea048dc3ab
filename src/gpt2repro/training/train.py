"""The training loop: one process or many under torchrun, on CPU or GPU.

`Trainer.fit` reads top to bottom: evaluate when due, take one optimizer step, log it, checkpoint
when due or asked to stop. Each job is one small method: `resume`, `forward_backward` (`grad_accum`
micro-batches, gradients synchronised across ranks only on the last one), `train_step` (NaN/inf
guard, warmup + cosine LR, clipping, the optimizer), `evaluate` (validation on the compiled model;
HellaSwag and samples on the uncompiled one, so neither triggers recompiles). A checkpoint holds
the weights, the optimizer state and `states` (the loader, the clock, the loop's own entry), each
saving itself. SIGTERM/SIGINT finish the step, checkpoint and exit; resuming continues
bit-identically on CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import torch

from ..checkpoint.checkpointer import Checkpointer, TrainingError, last_good, run_lock
from ..config.schema import TrainConfig
from ..data.loader import DataLoader
from ..data.shards import ShardError, manifest_sources, verify_shards
from ..evals import core, hellaswag
from ..files.fsio import WriteError, atomic_write_text
from ..model.precision import autocast, enable_tf32, slow_dtype_warning, tf32_enabled
from ..parallel.distributed import (
    all_reduce_mean,
    all_reduce_sum,
    full_parameters,
    set_grad_sync,
    setup,
    teardown,
)
from ..parallel.parallelize import build_model
from .clock import StopFlag, StopReason, TrainingClock
from .heap import reuse_freed_memory
from .metrics import MetricsLogger, StepStats, Throughput
from .mfu import Peak, synchronize
from .optim import build_optimizer, configure, lr_at, set_lr
from .plan import Plan, resolve


class MicroBatches(NamedTuple):
    """A step's micro-batches and how their losses make the step's: each micro-batch's loss, reduced
    over its tokens by `reduction` ("mean" or "sum"), divided by `divisor`, summed."""

    batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
    reduction: str
    divisor: float


class InLoopHellaSwag(NamedTuple):
    """The HellaSwag examples scored during training, rendered once for the whole run."""

    examples: list[dict]
    rendered: list[hellaswag.Rendered]


def _due(step: int, last: bool, every: int) -> bool:
    return every > 0 and (step % every == 0 or last)


class Trainer:
    """Everything one run holds: config, ranks, the model (raw, and wrapped for DDP/FSDP/compile),
    optimizer, data loaders, in-loop HellaSwag examples and the metrics logger."""

    def __init__(self, plan: Plan, data_dir: Path, run_dir: Path):
        cfg, info = plan.cfg, plan.info
        self.plan, self.cfg, self.info, self.run_dir, self.device = plan, cfg, info, run_dir, info.device
        self.data_sources = manifest_sources(data_dir)  # logged: the plot's reference lines depend on it
        enable_tf32(self.device)
        reuse_freed_memory(self.device)
        torch.manual_seed(cfg.seed)
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.verify_data:
            self._verify_data(data_dir)
        self.train_loader = self._loader(
            data_dir, "train", shuffle=cfg.shuffle, seed=cfg.seed, step_windows=plan.step_windows
        )
        self.val_loader = self._loader(data_dir, "val") if cfg.val_every else None
        examples = hellaswag.load_examples(limit=cfg.hellaswag_limit or None) if cfg.hellaswag_every else []
        self.hellaswag = InLoopHellaSwag(
            examples, [hellaswag.render(e, cfg.hellaswag_style) for e in examples]
        )
        self.core = core.Suite.for_run(cfg, info) if cfg.core_every else None  # CORE, tokenized once
        if cfg.sample_every:  # a prompt that cannot be sampled fails now, not after the first steps
            from ..generation.generate import prompt_tokens  # here: decoding's imports cost ~1.3 s a process

            prompt_tokens(cfg.sample_prompt, cfg.model.block_size)
        self.raw, self.model = build_model(cfg, info, plan.dtype, plan.compile, plan.pretrained)
        self.optimizers = build_optimizer(self.raw, cfg, self.device)
        # fp16's narrow range: the loss is scaled so gradients do not underflow, steps with inf skipped
        self.scaler = torch.amp.GradScaler(self.device.type) if plan.dtype == "fp16" else None
        self.logger = MetricsLogger(run_dir, cfg, enabled=False)  # the real one opens once resume succeeds
        # worse than guessing uniformly by far: the weights blew up (a finite loss can say so too)
        self.divergence_loss = 2 * math.log(cfg.model.vocab_size)
        self.start_step, self.started = 0, time.time()
        self.clock = TrainingClock(cfg, info, self.device)  # seconds of training, kept in checkpoints
        self.evaluated = True  # whether the step being saved (or resumed) has had its evaluation
        self.metrics: dict = {}  # each measurement's latest value
        peak = Peak(self.device, plan.dtype, info.world_size)  # for MFU
        self.throughput = Throughput(cfg, peak, self.raw.flops_per_token(cfg.seq_len))
        # a checkpoint: the weights, the optimizer state and these, each saving itself under its name
        self.states = {"loader": self.train_loader, "clock": self.clock, "trainer": self}
        self.checkpoints = Checkpointer(run_dir, cfg, info, print, self.raw, self.optimizers)

    def _verify_data(self, data_dir: Path) -> None:
        """Every rank hashes its share of the shards; any problem on any rank stops all of them."""
        checked, problems = verify_shards(data_dir, self.info.rank, self.info.world_size)
        total, bad = all_reduce_sum([checked, len(problems)], self.device)
        if bad:
            raise ShardError(
                problems[0] if problems else f"{int(bad)} shard(s) failed verification on other ranks"
            )
        if self.info.is_main:
            print(f"[gpt2repro] verified {int(total)} shards of {data_dir} against manifest.json")

    def _loader(self, data_dir: Path, split: str, **kw) -> DataLoader:
        cfg, info = self.cfg, self.info
        return DataLoader(
            data_dir,
            split,
            cfg.micro_batch_size,
            cfg.seq_len,
            info.rank,
            info.world_size,
            device=self.device,
            vocab_size=cfg.model.vocab_size,
            **kw,
        )

    def fit(self) -> dict:
        """Train from the latest checkpoint (or step 0) to max_steps. Each iteration starts with the
        weights of `step` updates: it evaluates them when due and saves them when due, then takes the
        next update; so the last iteration reports on exactly the weights it saves (nanochat's loop)."""
        cfg, metrics = self.cfg, self.metrics
        self.start_step = start = self.resume()
        self.logger = MetricsLogger(self.run_dir, cfg, self.info.is_main)
        self.logger.log("data", start, sources=self.data_sources)
        stop, reason = StopFlag(), self._schedule_end()
        # the step resumed from was evaluated before its checkpoint, unless a signal saved it at once
        redo = start > 0 and not self.evaluated
        self.started = time.time()
        self.throughput.start(start, self.started)
        try:
            for step in range(start, cfg.max_steps + 1):
                # the run ends after this iteration: max_steps reached, or a reason to stop came
                last_step = step == cfg.max_steps or reason is not None
                # no evaluation has seen these weights: new ones, the initial ones, or a redo
                not_yet_evaluated = step > start or step == 0 or redo
                # a signal saves at once, without an evaluation (the resume runs it)
                self.evaluated = not_yet_evaluated and reason is not StopReason.SIGNAL
                if self.evaluated:
                    metrics.update(self.evaluate(step, last_step))
                    if reason is None and self._reached_target(step, metrics):
                        reason, last_step = StopReason.TARGET, True
                # weights this run made (the step resumed from only as the last: now with its evaluation)
                worth_saving = step > start or (redo and last_step)
                # every ckpt_every steps, and whenever the run ends
                checkpoint_due = last_step or (cfg.ckpt_every > 0 and step % cfg.ckpt_every == 0)
                if worth_saving and checkpoint_due:
                    self.checkpoints.save(step, self.states)
                if last_step:
                    break
                stats = self.train_step(step)
                metrics.update(loss=stats.loss, lr=stats.lr, grad_norm=stats.grad_norm)
                rates = self.throughput.rates(step, stats.dt, time.time(), self.clock.left())
                # every log_every-th step on the console, and the last one
                print_step = cfg.log_every > 0 and (step % cfg.log_every == 0 or step + 1 == cfg.max_steps)
                self.logger.train_step(step, stats, rates, self.train_loader.epoch, print_step)
                reason = self.should_stop(stop) or self._schedule_end()
        finally:
            stop.restore()
            self.logger.close()
        self._report_end(reason, step)
        return {"step": step, "train_seconds": self.clock.train_seconds, **metrics}

    def _report_end(self, reason: StopReason | None, step: int) -> None:
        """Why the run ended before max_steps, if it did."""
        if reason in (StopReason.SIGNAL, StopReason.TIME_LIMIT):
            self.logger.print(
                f"[gpt2repro] stopping at step {step} ({reason.value}); checkpoint written, "
                "resume with the same command"
            )
        elif reason is not None:
            self.logger.print(f"[gpt2repro] finished at step {step} ({reason.value})")

    def _schedule_end(self) -> StopReason | None:
        return StopReason.SCHEDULE_END if self.clock.spent() else None

    def _reached_target(self, step: int, metrics: dict) -> bool:
        """Whether this step reached target_val_loss or target_core (logged once, as it ends the run)."""
        key = self.cfg.target_reached(step, metrics)
        if key is None:
            return False
        tokens, seconds = step * self.cfg.total_batch_size, self.clock.train_seconds
        self.logger.print(
            f"[gpt2repro] target {key} {getattr(self.cfg, 'target_' + key)} reached at step {step}: {tokens:,} tokens, "
            f"{seconds:.1f}s of training (evaluation excluded)"
        )
        self.logger.log("target", step, **{key: metrics[key]}, tokens=tokens, seconds=seconds)
        return True

    def resume(self) -> int:
        """Restore the checkpoint to resume from, if any (the Checkpointer decides which); the step
        to start at. Writes the resolved config.json and prints what is about to run."""
        cfg, info, plan = self.cfg, self.info, self.plan
        start, name = self.checkpoints.restore(self.states)
        configure(self.optimizers, cfg, self.device)  # this config's hyperparameters, not the saved ones
        if not info.is_main:
            return start
        atomic_write_text(self.run_dir / "config.json", cfg.to_json(), "the run's config")
        print(
            f"[gpt2repro] {self.raw.num_params():,} params | device {self.device} x{info.world_size} | "
            f"dtype {plan.dtype} | tf32 {'on' if tf32_enabled(self.device) else 'off'} | "
            f"compile {plan.compile} | grad_accum {plan.accum} | "
            f"steps {start}..{cfg.max_steps}" + (f" | resumed from {name}" if name else "")
        )
        print(f"[gpt2repro] {self.throughput.peak.describe()}")
        dtypes = {
            "dtype": plan.dtype,
            **({"muon_ns_dtype": cfg.muon_ns_dtype} if cfg.optimizer == "muon" else {}),
        }
        for key, dtype in dtypes.items():
            warning = slow_dtype_warning(dtype, self.device)
            if warning:
                print(f"[gpt2repro] warning: {key}: {warning}")
        return start

    def forward_backward(self) -> float:
        """Gradients of the mean loss over `accum` micro-batches, as one big batch would give them;
        returns that loss averaged over ranks."""
        self.model.train()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        step = self.micro_batches()
        for micro, (x, y) in enumerate(step.batches):
            set_grad_sync(self.model, self.raw, self.cfg, self.info, micro == self.plan.accum - 1)
            with autocast(self.device, self.plan.dtype):
                _, loss = self.model(x, y, reduction=step.reduction)
            loss = loss / step.divisor
            loss_sum += loss.detach()
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.scaler is not None:
            for opt in self.optimizers:
                self.scaler.unscale_(opt)
        return float(all_reduce_mean(loss_sum))

    def micro_batches(self) -> MicroBatches:
        """The step's micro-batches, read one at a time: each one's mean loss over accum is the
        step's mean (sft.SFTTrainer sums, then divides by the step's count of learned tokens)."""
        batches = (self.train_loader.next_batch() for _ in range(self.plan.accum))
        return MicroBatches(batches, "mean", self.plan.accum)

    def train_step(self, step: int) -> StepStats:
        """One optimizer step; what it measured."""
        t0 = time.time()
        loss = self.forward_backward()
        if not math.isfinite(loss) or loss > self.divergence_loss:
            self._diverged(step, f"loss is {loss}", blame_checkpoint=True)
        compiling = self.plan.compile and step == self.start_step
        lr = lr_at(self.clock.position(step, time.time() - t0, compiling), self.cfg)
        set_lr(self.optimizers, lr)
        norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), self.cfg.grad_clip)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if self.scaler is None and not math.isfinite(norm):  # (fp16's scaler skips such steps itself)
            self._diverged(step, f"gradient norm is {norm}", blame_checkpoint=False)
        if self.scaler is not None:
            for opt in self.optimizers:
                self.scaler.step(opt)
            self.scaler.update()
        else:
            for opt in self.optimizers:
                opt.step()
        synchronize(self.device)  # only for honest timing
        dt = time.time() - t0
        self.clock.tick(dt, compiling)
        return StepStats(loss, lr, norm, dt, self.clock.train_seconds)

    def _diverged(self, step: int, what: str, blame_checkpoint: bool) -> None:
        """Stop before the update. When the weights at the start of `step` produced the divergence,
        a checkpoint holding them is not good: it is set aside, never resumed from."""
        note = self.checkpoints.set_aside(step) if blame_checkpoint else ""
        raise TrainingError(f"{what} at step {step}; stopping{note} ({last_good(self.run_dir)})")

    def evaluate(self, step: int, last: bool) -> dict:
        """Validation loss, HellaSwag and samples, each when due (and always on the last step); the
        numbers measured."""
        cfg, out = self.cfg, {}
        if self.val_loader is not None and _due(step, last, cfg.val_every):
            out.update(val_loss=self.validation_loss(), val_step=step)
            self.logger.print(f"step {step:6d} | val loss {out['val_loss']:.4f}")
            self.logger.log("val", step, loss=out["val_loss"])
        hellaswag_due = self.hellaswag.examples and _due(step, last, cfg.hellaswag_every)
        sample_due = cfg.sample_every and step > 0 and _due(step, last, cfg.sample_every)
        core_due = self.core is not None and _due(step, last, cfg.core_every)
        if not (hellaswag_due or sample_due or core_due):
            return out
        # each calls the raw model's parts directly, past FSDP's hooks; eagerly: FSDP's blocks are
        # compiled for training (a KV cache does not fit their full graph; HellaSwag's lengths vary)
        with full_parameters(self.raw), torch.compiler.set_stance("force_eager"):
            if hellaswag_due:
                out["hellaswag_acc_norm"] = self.eval_hellaswag(step)
            if core_due:
                out.update(self.core.run(step, self.raw, self.device, self.plan.dtype, self.logger))
            if sample_due:
                self.logger.sample(step, self.samples())
        return out

    def samples(self) -> list[str]:
        """The in-loop samples: continuations of sample_prompt."""
        from ..generation.generate import sample_text
        from ..generation.sampling import Sampling

        cfg, sampling = self.cfg, Sampling(top_k=50, seed=42 + self.info.rank)
        return sample_text(
            self.raw, cfg.sample_prompt, cfg.sample_count, cfg.sample_tokens, sampling=sampling
        )

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean loss over the first val_steps batches of the val split (the same ones every time)."""
        self.model.eval()
        self.val_loader.reset()
        total = torch.zeros((), device=self.device)
        for _ in range(self.cfg.val_steps):
            x, y = self.val_loader.next_batch()
            with autocast(self.device, self.plan.dtype):
                _, loss = self.model(x, y)
            total += loss.detach() / self.cfg.val_steps
        return float(all_reduce_mean(total))

    def eval_hellaswag(self, step: int) -> float:
        """HellaSwag in the training's autocast dtype, sharded over the ranks; its acc_norm."""
        info, style = self.info, self.cfg.hellaswag_style
        result = hellaswag.evaluate(
            self.raw,
            self.hellaswag.examples,
            style,
            self.device,
            info.rank,
            info.world_size,
            dtype=self.plan.dtype,
            lockstep=self.cfg.fsdp,
            rendered=self.hellaswag.rendered,
        )
        self.logger.print(
            f"step {step:6d} | hellaswag {result['n']} ex: acc {result['acc']:.4f} acc_norm {result['acc_norm']:.4f}"
        )
        self.logger.log(
            "hellaswag", step, n=result["n"], acc=result["acc"], acc_norm=result["acc_norm"], style=style
        )
        return result["acc_norm"]

    def should_stop(self, stop: StopFlag) -> StopReason | None:
        """A reason to stop now, agreed by all ranks (any rank's signal stops every rank)."""
        flags = [
            float(stop.signal is not None),
            float(self.cfg.time_limit > 0 and time.time() - self.started > self.cfg.time_limit),
        ]
        if self.info.distributed:
            flags = all_reduce_sum(flags, self.device)
        if flags[0]:
            return StopReason.SIGNAL
        return StopReason.TIME_LIMIT if flags[1] else None

    def state_dict(self) -> dict:
        """The loop's own entry in a checkpoint: whether its step had its evaluation, and the latest
        measurements (for whoever reads state.json; a resume measures afresh)."""
        return {
            "evaluated": self.evaluated,
            "metrics": {k: v for k, v in self.metrics.items() if k != "val_step"},
        }

    def load_state_dict(self, state: dict) -> None:
        self.evaluated = bool(state.get("evaluated", True))  # (checkpoints before this key: evaluated)


def train(
    cfg: TrainConfig, data_dir: str | Path, run_dir: str | Path, trainer: type[Trainer] | None = None
) -> dict:
    """Run (or resume) training; returns a summary of the last step. `cfg` is not changed. `trainer`:
    a Trainer subclass (sft.SFTTrainer for conversations)."""
    info = setup(cfg.device)
    run_dir = Path(run_dir)
    try:
        with run_lock(run_dir, info):  # one writer per run directory
            run = (trainer or Trainer)(resolve(cfg, info), Path(data_dir), run_dir)
            if info.is_main:
                run.checkpoints.warn_about_space()
            return run.fit()
    except WriteError as e:  # a full, read-only or vanished disk: say what a resume starts from
        raise WriteError(f"{e}; {last_good(run_dir)}") from None
    finally:
        teardown()
