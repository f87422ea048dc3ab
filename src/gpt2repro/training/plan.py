"""A run's configuration resolved once, for its ranks and its device: what the loop reads.

`resolve` validates the config once, takes the architecture from the weights when the run starts
from pretrained ones (`init_from`), and settles everything that depends on the world size or the
device: gradient accumulation, the autocast dtype, compile, activation checkpointing. It works on a
copy: the caller's config is never changed."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch

from ..config.schema import ConfigError, TrainConfig
from ..interop.hf import load_pretrained
from ..model.gpt import GPT
from ..model.precision import resolve_dtype
from ..parallel.distributed import DistInfo


@dataclass(frozen=True)
class Plan:
    cfg: TrainConfig  # resolved: with init_from, the weights' architecture (its vocab padding kept)
    info: DistInfo
    accum: int  # micro-batches per optimizer step on each rank
    dtype: str  # the autocast dtype, `auto` resolved for the device
    compile: bool
    pretrained: GPT | None  # the weights to start from (init_from), else None

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def step_windows(self) -> int:
        """Data windows per optimizer step: fixed by the global batch, so resumable on any world size."""
        return self.accum * self.info.world_size


def grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    per_step = cfg.micro_batch_size * cfg.seq_len * world_size
    if cfg.total_batch_size % per_step:
        lo = max(per_step, cfg.total_batch_size // per_step * per_step)
        hi = lo + per_step if lo < cfg.total_batch_size else lo
        raise ConfigError(
            f"total_batch_size={cfg.total_batch_size} is not divisible by micro_batch_size*seq_len*world_size"
            f"={cfg.micro_batch_size}*{cfg.seq_len}*{world_size}={per_step}; nearest valid: {lo} or {hi}",
            "total_batch_size",
        )
    return cfg.total_batch_size // per_step


def _with_pretrained_architecture(cfg: TrainConfig, info: DistInfo) -> tuple[TrainConfig, GPT]:
    """init_from's weights, and the config with their architecture (the run's vocab padding kept)."""
    pretrained = load_pretrained(cfg.init_from)
    stated = cfg.model
    model = dataclasses.replace(pretrained.config, vocab_multiple=stated.vocab_multiple)
    model = model.as_chat() if stated.chat else model  # a chat run adds the chat tokens to the weights'
    changed = [f"{k}={v}" for k, v in dataclasses.asdict(model).items() if getattr(stated, k) != v]
    if changed and info.is_main:  # a config file's [model] keys may say otherwise: say who won
        print(
            f"[gpt2repro] init_from={cfg.init_from}: the weights' architecture, not the config's: {', '.join(changed)}"
        )
    return dataclasses.replace(cfg, model=model).validate(), pretrained


def resolve(cfg: TrainConfig, info: DistInfo) -> Plan:
    """The run's plan; the one place a config is validated and interpreted for training."""
    cfg = copy.deepcopy(cfg).validate()
    pretrained = None
    if cfg.init_from:
        cfg, pretrained = _with_pretrained_architecture(cfg, info)
    return Plan(
        cfg=cfg,
        info=info,
        accum=grad_accum_steps(cfg, info.world_size),
        dtype=resolve_dtype(cfg.dtype, info.device),
        compile=cfg.compile,
        pretrained=pretrained,
    )
