"""Process-group set-up for torchrun (NCCL on CUDA, gloo on CPU), device selection, and wrapping a
model for data parallelism (DDP, or FSDP2 for large sizes) with control of gradient sync.

Single-process runs need no environment; under torchrun, RANK/LOCAL_RANK/WORLD_SIZE (and, for
several nodes, MASTER_ADDR/MASTER_PORT) come from torchrun itself."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config.schema import DEVICE, ConfigError, TrainConfig
from ..errors import UserError
from ..model.gpt import GPT


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str = "auto") -> torch.device:
    """cuda > mps > cpu unless a device is named."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if preference != "auto":
        if not isinstance(preference, str) or not DEVICE.fullmatch(preference):  # xpu, a typo: not ours
            raise ConfigError(f"device={preference!r}: expected auto, cpu, cuda, cuda:N or mps")
        device = torch.device(preference)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={preference} requested but CUDA is not available")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(
                f"device={preference}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        if device.type == "mps" and not mps:
            raise ConfigError(f"device={preference} requested but MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if mps:
        return torch.device("mps")
    return torch.device("cpu")


def setup(device_preference: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one; pick this process's device."""
    if "RANK" not in os.environ:
        return DistInfo(0, 0, 1, pick_device(device_preference))
    rank, local_rank, world = (
        int(os.environ["RANK"]),
        int(os.environ["LOCAL_RANK"]),
        int(os.environ["WORLD_SIZE"]),
    )
    device = pick_device(device_preference)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            device_id=device if device.type == "cuda" else None,
        )
    return DistInfo(rank, local_rank, world, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Sum plain numbers over all ranks (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (SUM then divide: gloo has no AVG)."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def stop_together(error: Exception | None, device: torch.device, elsewhere: Exception) -> None:
    """Every rank raises when any rank failed: its own error, or `elsewhere` (saying another rank
    failed). One all-reduce that every rank reaches, so none is left waiting in a later collective."""
    if all_reduce_sum([float(error is not None)], device)[0]:
        raise error or elsewhere


def wrap_model(raw: GPT, cfg: TrainConfig, info: DistInfo, compile_model: bool) -> torch.nn.Module:
    """Activation checkpointing as configured, DDP for several ranks, then whole-model torch.compile;
    the raw module stays usable for eval. (FSDP runs are built sharded: `parallelize`.)"""
    raw.recompute_interval = cfg.recompute_interval
    model: torch.nn.Module = raw
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # gradients live in DDP's communication buckets: no copy in or out of them per step
        model = DDP(
            raw,
            device_ids=[info.local_rank] if info.device.type == "cuda" else None,
            gradient_as_bucket_view=True,
        )
    return torch.compile(model) if compile_model else model


def set_grad_sync(model: torch.nn.Module, raw: GPT, cfg: TrainConfig, info: DistInfo, sync: bool) -> None:
    """Whether the next backward all-reduces gradients: only the last micro-step of an optimizer step
    does. Set before that micro-step's forward pass."""
    if not info.distributed:
        return
    if cfg.fsdp:
        raw.set_requires_gradient_sync(sync)
    else:
        ddp = getattr(model, "_orig_mod", model)
        ddp.require_backward_grad_sync = sync


@contextmanager
def full_parameters(raw: GPT) -> Iterator[None]:
    """The root module's own parameters (wte, wpe, ln_f) unsharded while calls bypass its forward
    (`hidden`, `logits`: HellaSwag, sampling); each block still gathers its own in its forward hooks.
    Without FSDP, nothing to do. Every rank must enter it (the gather is a collective)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(raw, FSDPModule):
        yield
        return
    raw.unshard()
    try:
        yield
    finally:
        raw.reshard()


def agree(info: DistInfo, value: tuple[int, ...], what: str, describe: Callable[[tuple], str] = str) -> None:
    """Stop every rank with one line when ranks hold different values of `what` (e.g. which checkpoint
    each found): one all-gather, so no rank is left waiting in a later collective."""
    if not info.distributed:
        return
    mine = torch.tensor(value, dtype=torch.int64, device=info.device)
    gathered = [torch.zeros_like(mine) for _ in range(info.world_size)]
    dist.all_gather(gathered, mine)
    groups: dict[tuple, list[str]] = {}
    for rank, v in enumerate(gathered):
        groups.setdefault(tuple(v.tolist()), []).append(str(rank))
    if len(groups) > 1:
        detail = "; ".join(f"rank {','.join(r)}: {describe(v)}" for v, r in groups.items())
        raise DisagreementError(f"ranks disagree on {what} ({detail})")


class DisagreementError(UserError, RuntimeError):
    """Ranks of one job hold different state (e.g. different checkpoints); the message names them."""
