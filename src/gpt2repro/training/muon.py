"""torch.optim.Muon with two options it lacks: the Newton-Schulz dtype and c_attn's Q, K, V
orthogonalised apart. Imported only when a run uses Muon (torch.optim.Muon is torch 2.9+)."""

from __future__ import annotations

import torch
from torch.optim._muon import _adjust_lr

from ..model.precision import torch_dtype


def newton_schulz(
    g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """torch.optim.Muon's quintic iteration, operation for operation (so bf16 gives its bits), in `dtype`."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    x = x.T if tall else x
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class GPTMuon(torch.optim.Muon):
    """torch.optim.Muon (Nesterov momentum, decoupled weight decay, its LR adjustment, here per
    block) with two group options: `ns_dtype` (the Newton-Schulz dtype) and `split` (orthogonalise
    the matrix as that many equal row blocks: 3 for c_attn's Q, K, V). The state is torch's."""

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch's signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            bufs: list[torch.Tensor] = []
            self._init_group(group, params, grads, bufs)
            lr, mu = group["lr"], group["momentum"]
            for p, g, buf in zip(params, grads, bufs):
                buf.lerp_(g, 1 - mu)
                update = g.lerp(buf, mu) if group["nesterov"] else buf
                blocks = update.chunk(group["split"], dim=0)
                ortho = [
                    newton_schulz(
                        b,
                        group["ns_coefficients"],
                        group["ns_steps"],
                        group["eps"],
                        torch_dtype(group["ns_dtype"]),
                    )
                    for b in blocks
                ]
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(torch.cat(ortho), alpha=-_adjust_lr(lr, group["adjust_lr_fn"], blocks[0].shape))
        return loss
