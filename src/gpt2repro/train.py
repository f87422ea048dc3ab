"""The training loop: one process or many under torchrun, on CPU or GPU.

Per optimizer step: `grad_accum` micro-batches (gradients synchronised across ranks only on the
last one), loss averaged over ranks, NaN/inf guard, gradient clipping, warmup + cosine LR, AdamW.
Every so often: validation loss (on the compiled model, fixed shapes), HellaSwag and samples (on the
uncompiled module, so neither triggers recompiles), checkpoints. SIGTERM/SIGINT finish the step,
checkpoint and exit; resuming from that checkpoint continues bit-identically on CPU.
"""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint
from .bench import device_peak_flops
from .config import ConfigError, TrainConfig
from .data.loader import DataLoader
from .distributed import DistInfo, all_reduce_mean, all_reduce_sum, setup, teardown
from .evals import hellaswag
from .fsio import atomic_write_text
from .generate import sample_text
from .model import GPT
from .optim import lr_at, make_optimizer

# Resuming requires these to match the checkpoint: they change the model or which batches come next.
RESUME_KEYS = ("model", "total_batch_size", "micro_batch_size", "seq_len", "seed", "shuffle")


class TrainingError(RuntimeError):
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


def resolve_dtype(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast_ctx(device: torch.device, dtype: str):
    if dtype == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


class Logger:
    """metrics.jsonl (one JSON object per event), samples.txt, console, optional TensorBoard/W&B."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, enabled: bool):
        self.enabled = enabled
        self.metrics = (run_dir / "metrics.jsonl").open("a") if enabled else None
        self.samples = (run_dir / "samples.txt").open("a") if enabled else None
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

    def log(self, event: str, step: int, **values) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps({"event": event, "step": step, **values}) + "\n")
        self.metrics.flush()
        numbers = {f"{event}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def sample(self, step: int, texts: list[str]) -> None:
        if not self.enabled:
            return
        for text in texts:
            self.samples.write(f"step {step}: {text!r}\n")
            print(f"  sample: {text!r}")
        self.samples.flush()
        self.log("sample", step, texts=texts)

    def close(self) -> None:
        for f in (self.metrics, self.samples):
            if f is not None:
                f.close()
        if self.tb is not None:
            self.tb.close()


class _StopFlag:
    """SIGTERM/SIGINT set a flag checked after each step, so a preempted run checkpoints cleanly."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _wrap(raw: GPT, cfg: TrainConfig, info: DistInfo, compile_model: bool) -> torch.nn.Module:
    """DDP or FSDP2 for several ranks, then torch.compile; the raw module stays usable for eval."""
    model: torch.nn.Module = raw
    if cfg.fsdp and info.distributed:
        from torch.distributed.fsdp import fully_shard

        for block in raw.transformer.h:
            fully_shard(block)
        fully_shard(raw)
    elif info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(raw, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    return torch.compile(model) if compile_model else model


def _sync_grads(model: torch.nn.Module, raw: GPT, cfg: TrainConfig, info: DistInfo, sync: bool) -> None:
    """Only the last micro-step all-reduces gradients; set before its forward pass."""
    if not info.distributed:
        return
    if cfg.fsdp:
        raw.set_requires_gradient_sync(sync)
    else:
        ddp = getattr(model, "_orig_mod", model)
        ddp.require_backward_grad_sync = sync


def train(cfg: TrainConfig, data_dir: str, run_dir: str) -> dict:
    """Run (or resume) training; returns a summary of the last step."""
    cfg.validate()
    info = setup(cfg.device)
    try:
        return _train(cfg, Path(data_dir), Path(run_dir), info)
    finally:
        teardown()


def _train(cfg: TrainConfig, data_dir: Path, run_dir: Path, info: DistInfo) -> dict:
    device, is_main = info.device, info.is_main
    accum = grad_accum_steps(cfg, info.world_size)
    dtype = resolve_dtype(cfg, device)
    compile_model = cfg.compile == "true" or (cfg.compile == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
    torch.manual_seed(cfg.seed)

    run_dir.mkdir(parents=True, exist_ok=True)

    def loader(split: str, **kw) -> DataLoader:
        return DataLoader(
            data_dir,
            split,
            cfg.micro_batch_size,
            cfg.seq_len,
            info.rank,
            info.world_size,
            device=device,
            vocab_size=cfg.model.vocab_size,
            **kw,
        )

    train_loader = loader("train", shuffle=cfg.shuffle, seed=cfg.seed)
    val_loader = loader("val") if cfg.val_every else None
    hs_examples = hellaswag.load_examples(limit=cfg.hellaswag_limit or None) if cfg.hellaswag_every else []
    hs_rendered = [hellaswag.render(e, cfg.hellaswag_style) for e in hs_examples]

    raw = GPT(cfg.model).to(device)
    model = _wrap(raw, cfg, info, compile_model)
    optimizer = make_optimizer(raw, cfg, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == "fp16" and device.type == "cuda" else None

    start = 0
    ckpt = checkpoint.latest(run_dir) if cfg.resume == "auto" else None
    if ckpt is not None:
        saved = checkpoint.read_config(ckpt)
        diffs = [k for k in RESUME_KEYS if getattr(saved, k) != getattr(cfg, k)]
        if diffs:
            raise TrainingError(
                f"cannot resume {ckpt}: config differs in {', '.join(diffs)}; use a new --out"
            )
        state = checkpoint.load_training(ckpt, raw, optimizer)
        if state["world_size"] != info.world_size:
            raise TrainingError(
                f"cannot resume {ckpt}: saved with world_size={state['world_size']}, now {info.world_size}; "
                "the data order depends on it (restart with the same number of ranks)"
            )
        train_loader.load_state_dict(state["loader"])
        start = state["step"]
    if is_main:
        atomic_write_text(run_dir / "config.json", cfg.to_json())
        print(
            f"[gpt2repro] {raw.num_params():,} params | device {device} x{info.world_size} | dtype {dtype} | "
            f"compile {compile_model} | grad_accum {accum} | steps {start}..{cfg.max_steps}"
            + (f" | resumed from {ckpt.name}" if ckpt else "")
        )
    logger = Logger(run_dir, cfg, is_main)
    stop = _StopFlag()
    peak = device_peak_flops(device, dtype)
    flops_per_step = raw.flops_per_token(cfg.seq_len) * cfg.total_batch_size
    started = time.time()
    last_metrics: dict = {}

    def periodic(step: int, last: bool) -> None:
        """Validation, HellaSwag and samples when due (and always on the last step)."""
        if val_loader is not None and _due(step, last, cfg.val_every):
            val = _validate(model, val_loader, cfg, device, dtype)
            last_metrics["val_loss"] = val
            if is_main:
                print(f"step {step:6d} | val loss {val:.4f}")
            logger.log("val", step, loss=val)
        if hs_examples and _due(step, last, cfg.hellaswag_every):
            result = hellaswag.evaluate(
                raw,
                hs_examples,
                cfg.hellaswag_style,
                device,
                info.rank,
                info.world_size,
                dtype="bf16" if dtype == "bf16" else "fp32",
                lockstep=cfg.fsdp,
                rendered=hs_rendered,
            )
            last_metrics["hellaswag_acc_norm"] = result["acc_norm"]
            if is_main:
                print(
                    f"step {step:6d} | hellaswag {result['n']} ex: acc {result['acc']:.4f} acc_norm {result['acc_norm']:.4f}"
                )
            logger.log(
                "hellaswag",
                step,
                **{k: v for k, v in result.items() if k != "style"},
                style=result["style"],
            )
        if cfg.sample_every and step > 0 and _due(step, last, cfg.sample_every):
            texts = sample_text(
                raw, cfg.sample_prompt, cfg.sample_count, cfg.sample_tokens, seed=42 + info.rank
            )
            logger.sample(step, texts)

    step = start
    try:
        for step in range(start, cfg.max_steps):
            last = step == cfg.max_steps - 1
            periodic(step, last)

            t0 = time.time()
            loss = _train_step(model, raw, optimizer, scaler, train_loader, cfg, info, dtype, accum)
            if not math.isfinite(loss):
                good = checkpoint.latest(run_dir)
                raise TrainingError(
                    f"loss is {loss} at step {step}; stopping (last good checkpoint: {good or 'none'})"
                )
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()  # only for honest timing
            dt = time.time() - t0
            tok_s = cfg.total_batch_size / dt
            mfu = flops_per_step / dt / (peak * info.world_size) if peak else None
            eta = (time.time() - started) / (step + 1 - start) * (cfg.max_steps - step - 1)
            last_metrics.update(loss=loss, lr=lr, grad_norm=norm)
            logger.log(
                "train",
                step,
                loss=loss,
                lr=lr,
                grad_norm=norm,
                dt=dt,
                tok_per_s=tok_s,
                mfu=mfu,
                eta_s=eta,
                epoch=train_loader.epoch,
            )
            if is_main and cfg.log_every and (step % cfg.log_every == 0 or last):
                mfu_s = f" | mfu {100 * mfu:.1f}%" if mfu is not None else ""
                print(
                    f"step {step:6d} | loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | dt {1000 * dt:.0f}ms | "
                    f"tok/s {tok_s:,.0f}{mfu_s} | eta {eta / 60:.1f}min",
                    flush=True,
                )

            done = step + 1
            stopping = _should_stop(stop, cfg, started, info)
            if stopping == "time limit":  # a budgeted run still ends with its final evaluation
                periodic(done, True)
            if stopping or last or (cfg.ckpt_every and done % cfg.ckpt_every == 0):
                _save(run_dir, done, raw, optimizer, train_loader, cfg, info, last_metrics)
            if stopping:
                if is_main:
                    print(
                        f"[gpt2repro] stopping after step {step} ({stopping}); checkpoint written, resume with the same command"
                    )
                step = done
                break
        else:
            step = cfg.max_steps
    finally:
        stop.restore()
        logger.close()
    return {"step": step, **last_metrics}


def _due(step: int, last: bool, every: int) -> bool:
    return every > 0 and (step % every == 0 or last)


def _train_step(model, raw, optimizer, scaler, loader, cfg, info, dtype, accum) -> float:
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=info.device)
    for micro in range(accum):
        x, y = loader.next_batch()
        _sync_grads(model, raw, cfg, info, micro == accum - 1)
        with autocast_ctx(info.device, dtype):
            _, loss = model(x, y)
        loss = loss / accum  # the mean over the whole accumulated batch, as one big batch would give
        loss_sum += loss.detach()
        (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    return float(all_reduce_mean(loss_sum))


@torch.no_grad()
def _validate(model, loader: DataLoader, cfg: TrainConfig, device, dtype: str) -> float:
    model.eval()
    loader.reset()
    total = torch.zeros((), device=device)
    for _ in range(cfg.val_steps):
        x, y = loader.next_batch()
        with autocast_ctx(device, dtype):
            _, loss = model(x, y)
        total += loss.detach() / cfg.val_steps
    return float(all_reduce_mean(total))


def _should_stop(stop: _StopFlag, cfg: TrainConfig, started: float, info: DistInfo) -> str | None:
    """A reason to stop now, agreed by all ranks (any rank's signal stops every rank)."""
    flags = [
        float(stop.signal is not None),
        float(cfg.time_limit > 0 and time.time() - started > cfg.time_limit),
    ]
    if info.distributed:
        flags = all_reduce_sum(flags, info.device)
    if flags[0]:
        return "signal"
    if flags[1]:
        return "time limit"
    return None


def _save(run_dir, step, raw, optimizer, loader, cfg, info, metrics) -> None:
    model_state, optim_state = checkpoint.gather(raw, optimizer)
    if info.is_main:
        state = {"loader": loader.state_dict(), "world_size": info.world_size, "metrics": metrics}
        path = checkpoint.save(run_dir, step, model_state, optim_state, state, cfg, cfg.keep_last)
        print(f"[gpt2repro] checkpoint {path}")
    if info.distributed:
        dist.barrier()
