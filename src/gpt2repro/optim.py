"""The optimizers and the learning-rate schedule: the one place a training run's optimisation is
decided, so the loop never changes when a choice is added.

`adamw`: AdamW on everything, weight decay on matrices and embeddings (dim >= 2) only; fused (one
pass per group) on CUDA and CPU. `muon`: torch.optim.Muon (momentum orthogonalised by Newton-Schulz)
for the 2-D matrices inside the blocks (attention c_attn/c_proj, MLP c_fc/c_proj), AdamW as above for
the rest (tied embedding/lm_head, positions, LayerNorms, biases). Muon's step is scaled to AdamW's
update RMS ("match_rms_adamw"), so its LR lives on AdamW's scale and carries across widths.
Schedules: warmup then cosine to min_lr_ratio (the original), or warmup-stable-decay (`wsd`)."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig

HIDDEN_MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _adamw(params: list[torch.nn.Parameter], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def build_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, device: torch.device
) -> list[torch.optim.Optimizer]:
    """The run's optimizers, stepped together. Each param group's `lr_scale` is its LR relative to
    the schedule's (max_lr at the peak)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return [_adamw([p for _, p in named], cfg, device)]
    hidden = [p for n, p in named if n.startswith("transformer.h.") and n.endswith(HIDDEN_MATRICES)]
    rest = [p for n, p in named if not (n.startswith("transformer.h.") and n.endswith(HIDDEN_MATRICES))]
    muon = torch.optim.Muon(
        hidden,
        lr=cfg.muon_lr,
        weight_decay=cfg.muon_weight_decay,
        momentum=cfg.muon_momentum,
        adjust_lr_fn="match_rms_adamw",
    )
    for group in muon.param_groups:
        group["lr_scale"] = cfg.muon_lr / cfg.max_lr
    return [muon, _adamw(rest, cfg, device)]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine (or stable, then a linear decay over the last
    wsd_decay_fraction of the steps: `wsd`) from max_lr down to min_lr_ratio * max_lr."""
    min_lr = cfg.max_lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
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
