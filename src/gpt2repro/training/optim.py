"""The optimizers and the learning-rate schedule: the one place a training run's optimisation is
decided, so the loop never changes when a choice is added.

`adamw`: AdamW on everything, weight decay on matrices and embeddings (dim >= 2) only; fused (one
pass per group) on CUDA and CPU. `muon`: torch.optim.Muon (momentum orthogonalised by Newton-Schulz)
for the 2-D matrices inside the blocks (attention c_attn/c_proj, MLP c_fc/c_proj), AdamW as above for
the rest (tied embedding/lm_head, positions, LayerNorms, biases). Muon's step is scaled to AdamW's
update RMS ("match_rms_adamw"), so its LR lives on AdamW's scale and carries across widths. Two
choices torch's Muon does not offer are added (`muon.GPTMuon`): the Newton-Schulz dtype (torch always
iterates in bf16, emulated hundreds of times slower on CPUs without native bf16) and orthogonalising
c_attn's Q, K and V blocks apart.
Schedules: warmup then cosine to min_lr_ratio (the original), or warmup-stable-decay (`wsd`)."""

from __future__ import annotations

import math

import torch

from ..config.schema import TrainConfig
from ..model.precision import resolve_dtype

HIDDEN_MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _adamw(params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.AdamW:
    groups = [{"params": [p for p in params if p.dim() >= 2]}, {"params": [p for p in params if p.dim() < 2]}]
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, fused=fused)  # LR, betas, eps, decay: configure()


def _muon(named: list[tuple[str, torch.nn.Parameter]]) -> torch.optim.Optimizer:
    from .muon import GPTMuon  # torch.optim.Muon is torch 2.9+: AdamW runs never import it

    groups = [
        {"params": [p for n, p in named if n.endswith("attn.c_attn.weight")], "qkv": True},
        {"params": [p for n, p in named if not n.endswith("attn.c_attn.weight")], "qkv": False},
    ]
    return GPTMuon(groups, adjust_lr_fn="match_rms_adamw")


def configure(optimizers: list[torch.optim.Optimizer], cfg: TrainConfig, device: torch.device) -> None:
    """Put the config's hyperparameters on the param groups: at build, and again after a checkpoint
    is loaded (torch restores the saved ones), so that the config, not the checkpoint, decides."""
    ns_dtype = resolve_dtype(cfg.muon_ns_dtype, device)  # a name, as the state is saved
    ns_dtype = "fp32" if ns_dtype == "fp16" else ns_dtype  # fp16's range is too narrow for the iteration
    for opt in optimizers:
        for group in opt.param_groups:
            if "ns_coefficients" in group:  # a Muon group
                split = 3 if group["qkv"] and cfg.muon_split_qkv else 1
                group.update(momentum=cfg.muon_momentum, weight_decay=cfg.muon_weight_decay)
                group.update(lr_scale=cfg.muon_peak_lr / cfg.max_lr, ns_dtype=ns_dtype, split=split)
            else:
                group.update(betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
                decay = all(p.dim() >= 2 for p in group["params"])  # matrices and embeddings only
                group["weight_decay"] = cfg.weight_decay if decay else 0.0


def build_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, device: torch.device
) -> list[torch.optim.Optimizer]:
    """The run's optimizers, stepped together. Each param group's `lr_scale` is its LR relative to
    the schedule's (max_lr at the peak)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        optimizers = [_adamw([p for _, p in named], device)]
    else:
        is_hidden = [n.startswith("transformer.h.") and n.endswith(HIDDEN_MATRICES) for n, _ in named]
        hidden = [np for np, h in zip(named, is_hidden) if h]
        rest = [p for (_, p), h in zip(named, is_hidden) if not h]
        optimizers = [_muon(hidden), _adamw(rest, device)]
    configure(optimizers, cfg, device)
    return optimizers


def schedule_position(step: int, train_seconds: float, cfg: TrainConfig) -> float:
    """Where the schedule is, in steps: `step`; with schedule_clock=time, the step that the share of
    time_budget spent corresponds to when that is further (a host that slows down moves the schedule
    on by the clock, so warmup and decay still end inside the budget)."""
    if cfg.schedule_clock == "time":
        return max(float(step), train_seconds / cfg.time_budget * cfg.max_steps)
    return step


def lr_at(step: float, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine (or stable, then a linear decay over the last
    wsd_decay_fraction of the steps: `wsd`) from max_lr down to min_lr_ratio * max_lr. `step` may
    be fractional (`schedule_position`)."""
    min_lr = cfg.max_lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:  # (a fractional step past warmup_steps - 1 would overshoot: capped)
        return cfg.max_lr * min(1.0, (step + 1) / cfg.warmup_steps)
    if step >= cfg.max_steps:
        return min_lr
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.wsd_decay_fraction * cfg.max_steps))
        left = cfg.max_steps - step
        return cfg.max_lr if left > decay_steps else min_lr + (cfg.max_lr - min_lr) * left / decay_steps
    ratio = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.max_lr - min_lr)


def set_lr(optimizers: list[torch.optim.Optimizer], lr: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # x * 1.0 is x exactly: AdamW's LR unchanged
