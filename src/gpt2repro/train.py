"""The training loop: one process or many under torchrun, on CPU or GPU.

`Trainer.fit` reads top to bottom: evaluate when due, take one optimizer step, log it, checkpoint
when due or asked to stop. Each job is one small method: `resume`, `forward_backward` (`grad_accum`
micro-batches, gradients synchronised across ranks only on the last one), `train_step` (NaN/inf
guard, warmup + cosine LR, clipping, the optimizer), `evaluate` (validation on the compiled model;
HellaSwag and samples on the uncompiled one, so neither triggers recompiles), `save`.
SIGTERM/SIGINT finish the step, checkpoint and exit; resuming continues bit-identically on CPU.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint
from .config import ConfigError, TrainConfig
from .data.loader import DataLoader
from .data.shards import ShardError, verify_shards
from .distributed import (
    DisagreementError,
    DistInfo,
    agree,
    all_reduce_mean,
    all_reduce_sum,
    full_parameters,
    set_grad_sync,
    setup,
    teardown,
    wrap_model,
)
from .errors import UserError
from .evals import hellaswag
from .fsio import WriteError, atomic_write_text
from .generate import prompt_tokens, sample_text
from .hf import load_pretrained
from .metrics import MetricsLogger
from .mfu import Peak, synchronize
from .model import GPT
from .optim import build_optimizer, configure, lr_at, set_lr
from .precision import autocast, enable_tf32, resolve_dtype, slow_dtype_warning, tf32_enabled

# Resuming requires these to match the checkpoint: they change the model, which batches come next or
# the optimizer state's layout.
RESUME_KEYS = ("model", "total_batch_size", "micro_batch_size", "seq_len", "seed", "shuffle", "optimizer")


class TrainingError(UserError, RuntimeError):
    """Training cannot continue (non-finite loss, incompatible resume); the message says why."""


def grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    per_step = cfg.micro_batch_size * cfg.seq_len * world_size
    if cfg.total_batch_size % per_step:
        lo = max(per_step, cfg.total_batch_size // per_step * per_step)
        hi = lo + per_step if lo < cfg.total_batch_size else lo
        raise ConfigError(
            f"total_batch_size={cfg.total_batch_size} is not divisible by micro_batch_size*seq_len*world_size"
            f"={cfg.micro_batch_size}*{cfg.seq_len}*{world_size}={per_step}; nearest valid: {lo} or {hi}"
        )
    return cfg.total_batch_size // per_step


class StopReason(enum.Enum):
    SIGNAL = "signal"  # preempted: checkpoint at once, no evaluation
    TIME_LIMIT = "time limit"
    TARGET = "target val loss reached"


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


def _due(step: int, last: bool, every: int) -> bool:
    return every > 0 and (step % every == 0 or last)


class Trainer:
    """Everything one run holds: config, ranks, the model (raw, and wrapped for DDP/FSDP/compile),
    optimizer, data loaders, in-loop HellaSwag examples and the metrics logger."""

    def __init__(self, cfg: TrainConfig, data_dir: Path, run_dir: Path, info: DistInfo):
        self.cfg, self.info, self.run_dir, self.device = cfg, info, run_dir, info.device
        pretrained = self._pretrained() if cfg.init_from else None
        self.accum = grad_accum_steps(cfg, info.world_size)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.compiled = cfg.compile == "true" or (cfg.compile == "auto" and self.device.type == "cuda")
        enable_tf32(self.device)
        torch.manual_seed(cfg.seed)
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.verify_data:
            self._verify_data(data_dir)
        step_windows = self.accum * info.world_size  # fixed by the global batch: resumable on any world size
        self.train_loader = self._loader(
            data_dir, "train", shuffle=cfg.shuffle, seed=cfg.seed, step_windows=step_windows
        )
        self.val_loader = self._loader(data_dir, "val") if cfg.val_every else None
        examples = hellaswag.load_examples(limit=cfg.hellaswag_limit or None) if cfg.hellaswag_every else []
        self.hellaswag = (examples, [hellaswag.render(e, cfg.hellaswag_style) for e in examples])
        if cfg.sample_every:  # a prompt that cannot be sampled fails now, not after the first steps
            prompt_tokens(cfg.sample_prompt, cfg.model.block_size)
        self.raw = GPT(cfg.model).to(self.device)
        if pretrained is not None:
            self.raw.copy_weights_from(pretrained)
        self.model = wrap_model(self.raw, cfg, info, self.compiled)
        self.optimizers = build_optimizer(self.raw, cfg, self.device)
        # fp16's narrow range: the loss is scaled so gradients do not underflow, steps with inf skipped
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == "fp16" else None
        self.logger = MetricsLogger(run_dir, cfg, enabled=False)  # the real one opens once resume succeeds
        # worse than guessing uniformly by far: the weights blew up (a finite loss can say so too)
        self.divergence_loss = 2 * math.log(cfg.model.vocab_size)
        self.start_step, self.started = 0, time.time()
        self.peak = Peak(self.device, self.dtype, info.world_size)  # for MFU
        self.flops_per_step = self.raw.flops_per_token(cfg.seq_len) * cfg.total_batch_size

    def _pretrained(self) -> GPT:
        """The weights of init_from; the run's architecture becomes theirs (its vocab padding kept,
        and the chat tokens added when the run is a chat model)."""
        pretrained = load_pretrained(self.cfg.init_from)
        stated = self.cfg.model
        self.cfg.model = dataclasses.replace(pretrained.config, vocab_multiple=stated.vocab_multiple)
        self.cfg.model = self.cfg.model.as_chat() if stated.chat else self.cfg.model
        changed = [
            f"{k}={v}" for k, v in dataclasses.asdict(self.cfg.model).items() if getattr(stated, k) != v
        ]
        if changed and self.info.is_main:  # a config file's [model] keys may say otherwise: say who won
            print(
                f"[gpt2repro] init_from={self.cfg.init_from}: the weights' architecture, not the config's: {', '.join(changed)}"
            )
        self.cfg.validate()
        return pretrained

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
        cfg = self.cfg
        self.start_step = start = self.resume()
        self.logger = MetricsLogger(self.run_dir, cfg, self.info.is_main)
        stop, reason, metrics = StopFlag(), None, {}
        self.started = time.time()
        try:
            for step in range(start, cfg.max_steps + 1):
                last = step == cfg.max_steps or reason is not None
                # a resumed step was evaluated before its checkpoint; a preempted run saves at once
                if (step > start or step == 0) and reason is not StopReason.SIGNAL:
                    metrics.update(self.evaluate(step, last))
                    if reason is None and self._reached_target(step, metrics):
                        reason, last = StopReason.TARGET, True
                if step > start and (last or _due(step, False, cfg.ckpt_every)):
                    self.save(step, metrics)
                if last:
                    break
                stats = self.train_step(step)
                metrics.update(loss=stats["loss"], lr=stats["lr"], grad_norm=stats["grad_norm"])
                console = cfg.log_every > 0 and (step % cfg.log_every == 0 or step + 1 == cfg.max_steps)
                self.logger.train_step(step, stats, self.train_loader.epoch, console)
                reason = self.should_stop(stop)
        finally:
            stop.restore()
            self.logger.close()
        if reason is not None:
            self.logger.print(
                f"[gpt2repro] stopping at step {step} ({reason.value}); checkpoint written, "
                "resume with the same command"
            )
        return {"step": step, **metrics}

    def _reached_target(self, step: int, metrics: dict) -> bool:
        """Whether this step's validation reached target_val_loss (logged once, as it ends the run)."""
        target, val = self.cfg.target_val_loss, metrics.get("val_loss")
        if not target or val is None or val > target or metrics.get("val_step") != step:
            return False
        tokens, seconds = step * self.cfg.total_batch_size, time.time() - self.started
        self.logger.print(
            f"[gpt2repro] target val loss {target} reached at step {step}: {tokens:,} tokens, {seconds:.1f}s"
        )
        self.logger.log("target", step, val_loss=val, tokens=tokens, seconds=seconds)
        return True

    def resume(self) -> int:
        """Restore the run directory's latest good checkpoint (unless resume=never); the step to
        start at. A fresh run never shadows an earlier one's checkpoints unless overwrite=true.
        Writes the resolved config.json and prints what is about to run."""
        cfg, info = self.cfg, self.info
        found = self._find_checkpoint()
        if found is None:
            self._start_fresh()
        start = 0
        if found is not None:
            ckpt, state = found
            saved = checkpoint.read_config(ckpt)
            diffs = [k for k in RESUME_KEYS if getattr(saved, k) != getattr(cfg, k)]
            if diffs:
                raise TrainingError(
                    f"cannot resume {ckpt}: config differs in {', '.join(diffs)}; use a new --out"
                )
            checkpoint.load_training(ckpt, self.raw, self.optimizers, state)
            configure(self.optimizers, cfg, self.device)  # this config's hyperparameters, not the saved ones
            try:
                self.train_loader.load_state_dict(state["loader"])
            except ValueError as e:
                raise TrainingError(f"cannot resume {ckpt}: {e}") from None
            start = state["step"]
        if info.is_main:
            atomic_write_text(self.run_dir / "config.json", cfg.to_json())
            print(
                f"[gpt2repro] {self.raw.num_params():,} params | device {self.device} x{info.world_size} | "
                f"dtype {self.dtype} | tf32 {'on' if tf32_enabled(self.device) else 'off'} | "
                f"compile {self.compiled} | grad_accum {self.accum} | "
                f"steps {start}..{cfg.max_steps}" + (f" | resumed from {found[0].name}" if found else "")
            )
            dtypes = {"dtype": self.dtype}
            if cfg.optimizer == "muon":
                dtypes["muon_ns_dtype"] = cfg.muon_ns_dtype
            for key, dtype in dtypes.items():
                warning = slow_dtype_warning(dtype, self.device)
                if warning:
                    print(f"[gpt2repro] warning: {key}: {warning}")
        return start

    def _find_checkpoint(self) -> tuple[Path, dict] | None:
        """The checkpoint to resume from and its state, the same on every rank (nodes without shared
        storage each look in their own directory): or all ranks stop, naming the ones that differ."""
        log = print if self.info.is_main else (lambda message: None)
        found, problem = None, None
        try:
            found = checkpoint.latest_verified(self.run_dir, log) if self.cfg.resume != "never" else None
        except checkpoint.CheckpointError as e:  # every rank must still reach the agreement
            problem = e
        key = (
            (-2 if problem else -1, 0)
            if found is None
            else (found[1]["step"], checkpoint.fingerprint(found[0]))
        )
        try:
            agree(self.info, key, "the checkpoint to resume from", _describe_checkpoint)
        except DisagreementError as e:
            raise TrainingError(f"{self.run_dir}: {e}; give every rank the same run directory") from None
        if problem is not None:
            raise problem
        return found

    def _start_fresh(self) -> None:
        """Step 0 in a directory that may hold an earlier run: refuse, or with overwrite=true
        remove its checkpoints and logs first."""
        cfg = self.cfg
        earlier = checkpoint.all_steps(self.run_dir)
        if cfg.resume == "require":
            raise TrainingError(f"{self.run_dir}: no checkpoint to resume from (--resume / resume=require)")
        if not earlier:
            return
        if not cfg.overwrite:
            raise TrainingError(
                f"{self.run_dir} holds checkpoints of an earlier run ({earlier[-1].name}) that resume=never "
                "would shadow; resume it (resume=auto), use a new --out, or pass overwrite=true to delete them"
            )
        if self.info.is_main:
            shutil.rmtree(self.run_dir / "checkpoints")
            for name in ("metrics.jsonl", "samples.txt"):
                (self.run_dir / name).unlink(missing_ok=True)
            print(
                f"[gpt2repro] overwrite=true: deleted the earlier run's checkpoints and logs in {self.run_dir}"
            )
        if self.info.distributed:
            dist.barrier()

    def forward_backward(self) -> float:
        """Gradients of the mean loss over `accum` micro-batches, as one big batch would give them;
        returns that loss averaged over ranks."""
        self.model.train()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for micro, (x, y) in enumerate(self.micro_batches()):
            set_grad_sync(self.model, self.raw, self.cfg, self.info, micro == self.accum - 1)
            with autocast(self.device, self.dtype):
                _, loss = self.model(x, y, reduction=self.reduction)
            loss = loss / self.divisor
            loss_sum += loss.detach()
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.scaler is not None:
            for opt in self.optimizers:
                self.scaler.unscale_(opt)
        return float(all_reduce_mean(loss_sum))

    # each micro-batch's mean loss over accum: the step's mean (sft.SFTTrainer sums, then divides
    # by the step's count of learned tokens)
    reduction = "mean"

    def micro_batches(self):
        """The step's micro-batches, read one at a time (setting `divisor`)."""
        self.divisor = self.accum
        return (self.train_loader.next_batch() for _ in range(self.accum))

    def train_step(self, step: int) -> dict:
        """One optimizer step; returns what is logged about it."""
        t0 = time.time()
        loss = self.forward_backward()
        if not math.isfinite(loss) or loss > self.divergence_loss:
            self._diverged(step, f"loss is {loss}", blame_checkpoint=True)
        lr = lr_at(step, self.cfg)
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
        tok_s = self.cfg.total_batch_size / dt
        mfu = self.peak.mfu(self.flops_per_step, dt)
        done = step + 1 - self.start_step
        eta = (time.time() - self.started) / done * (self.cfg.max_steps - step - 1)
        return dict(loss=loss, lr=lr, grad_norm=norm, dt=dt, tok_per_s=tok_s, mfu=mfu, eta_s=eta)

    def _diverged(self, step: int, what: str, blame_checkpoint: bool) -> None:
        """Stop before the update. When the weights at the start of `step` produced the divergence,
        a checkpoint holding them is not good: it is set aside, never resumed from."""
        note = ""
        if blame_checkpoint and checkpoint.step_dir(self.run_dir, step).is_dir():
            if self.info.is_main:
                checkpoint.quarantine(self.run_dir, step)
            note = f"; checkpoint step_{step:08d} held these weights and was renamed diverged_step_{step:08d}"
        if self.info.distributed:
            dist.barrier()
        good = checkpoint.latest(self.run_dir, log=self.logger.print)
        raise TrainingError(f"{what} at step {step}; stopping{note} (last good checkpoint: {good or 'none'})")

    def evaluate(self, step: int, last: bool) -> dict:
        """Validation loss, HellaSwag and samples, each when due (and always on the last step); the
        numbers measured."""
        cfg, out = self.cfg, {}
        if self.val_loader is not None and _due(step, last, cfg.val_every):
            out.update(val_loss=self.validation_loss(), val_step=step)
            self.logger.print(f"step {step:6d} | val loss {out['val_loss']:.4f}")
            self.logger.log("val", step, loss=out["val_loss"])
        hellaswag_due = self.hellaswag[0] and _due(step, last, cfg.hellaswag_every)
        sample_due = cfg.sample_every and step > 0 and _due(step, last, cfg.sample_every)
        if not (hellaswag_due or sample_due):
            return out
        with full_parameters(self.raw):  # both call the raw model's parts directly, past FSDP's hooks
            if hellaswag_due:
                out["hellaswag_acc_norm"] = self.eval_hellaswag(step)
            if sample_due:
                self.logger.sample(step, self.samples())
        return out

    def samples(self) -> list[str]:
        """The in-loop samples: continuations of sample_prompt."""
        cfg = self.cfg
        return sample_text(
            self.raw, cfg.sample_prompt, cfg.sample_count, cfg.sample_tokens, seed=42 + self.info.rank
        )

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean loss over the first val_steps batches of the val split (the same ones every time)."""
        self.model.eval()
        self.val_loader.reset()
        total = torch.zeros((), device=self.device)
        for _ in range(self.cfg.val_steps):
            x, y = self.val_loader.next_batch()
            with autocast(self.device, self.dtype):
                _, loss = self.model(x, y)
            total += loss.detach() / self.cfg.val_steps
        return float(all_reduce_mean(total))

    def eval_hellaswag(self, step: int) -> float:
        """HellaSwag in the training's autocast dtype, sharded over the ranks; its acc_norm."""
        examples, rendered = self.hellaswag
        info = self.info
        style = self.cfg.hellaswag_style
        result = hellaswag.evaluate(
            self.raw,
            examples,
            style,
            self.device,
            info.rank,
            info.world_size,
            dtype=self.dtype,
            lockstep=self.cfg.fsdp,
            rendered=rendered,
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

    def save(self, step: int, metrics: dict) -> None:
        """Checkpoint after `step` steps: every rank gathers (FSDP needs it), rank 0 writes."""
        model_state, optim_state = checkpoint.gather(self.raw, self.optimizers)
        if self.info.is_main:
            state = {
                "loader": self.train_loader.state_dict(),
                "world_size": self.info.world_size,
                "metrics": {k: v for k, v in metrics.items() if k != "val_step"},
            }
            path = checkpoint.save(
                self.run_dir, step, model_state, optim_state, state, self.cfg, self.cfg.keep_last
            )
            self.logger.print(f"[gpt2repro] checkpoint {path}")
        if self.info.distributed:
            dist.barrier()


def _describe_checkpoint(key: tuple) -> str:
    if key[0] < 0:
        return "no checkpoint that verifies" if key[0] == -2 else "no checkpoint (fresh start)"
    return f"step {key[0]} (state {key[1]:015x})"


def train(
    cfg: TrainConfig, data_dir: str | Path, run_dir: str | Path, trainer: type[Trainer] | None = None
) -> dict:
    """Run (or resume) training; returns a summary of the last step. `trainer`: a Trainer subclass
    (sft.SFTTrainer for conversations)."""
    cfg.validate()
    info = setup(cfg.device)
    run_dir = Path(run_dir)
    try:
        with checkpoint.run_lock(run_dir, info):  # one writer per run directory
            run = (trainer or Trainer)(cfg, Path(data_dir), run_dir, info)
            if info.is_main:
                checkpoint.warn_about_space(run_dir, run.raw, run.optimizers, cfg.keep_last)
            return run.fit()
    except WriteError as e:  # a full, read-only or vanished disk: say what a resume starts from
        raise WriteError(f"{e}; {checkpoint.last_good(run_dir)}") from None
    finally:
        teardown()
