"""The run's model, built for its ranks the way torchtitan's `parallelize` builds one.

Without FSDP: `GPT(cfg)` on the host, moved to the device, then `distributed.wrap_model` (DDP,
whole-model torch.compile). With FSDP (`fsdp=true` under torchrun) no rank ever holds the whole
model: it is built on the meta device, each block compiled on its own (as torchtitan does;
FSDP2's hooks are excluded from Dynamo, so the all-gathers run between the graphs) and sharded
with `fully_shard`, and only then given memory (`to_empty`) and its initial weights. Those are bit for bit `torch.manual_seed(seed); GPT(cfg)`'s,
with the random stream left where that build leaves it: today's weights depend on the draws of the
`nn.Linear`/`nn.Embedding` constructors before `GPT._init_weights` redraws them, so every leaf
module's parameters are drawn again in that order, whole, on the host, one module at a time, and
each rank keeps its own shard.

Training in bf16, FSDP gathers the weights in bf16 and reduces gradients in fp32
(`MixedPrecisionPolicy`); the sharded weights, gradients and optimizer state stay fp32. The loop's
autocast stays on as well (torchtitan drops it under FSDP): it decides which ops run in bf16
(matmuls, attention) and which in fp32 (layer norms, the loss), the same on every path; the policy
decides what is communicated and held unsharded. The policy also casts each block's input to bf16,
so the residual stream is bf16 where one bf16 process keeps it fp32: losses close, not equal."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import distribute_tensor

from ..config.schema import TrainConfig
from ..model.gpt import GPT
from .distributed import DistInfo, wrap_model


def build_model(
    cfg: TrainConfig, info: DistInfo, dtype: str, compile_model: bool, pretrained: GPT | None
) -> tuple[GPT, nn.Module]:
    """(raw, wrapped): the raw model (for evaluation and checkpoints) and the one the loop calls."""
    if not (cfg.fsdp and info.distributed):
        raw = GPT(cfg.model).to(info.device)
        if pretrained is not None:
            raw.copy_weights_from(pretrained)
        return raw, wrap_model(raw, cfg, info, compile_model)
    raw = build_sharded(cfg, info, dtype, compile_model, pretrained)
    return raw, raw


def mixed_precision(dtype: str) -> MixedPrecisionPolicy:
    """FSDP's policy for the autocast dtype: bf16 weights gathered, fp32 gradients reduced; for
    fp32 the empty policy, FSDP's default: nothing cast (fp16 with FSDP is refused by the config)."""
    if dtype != "bf16":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def build_sharded(
    cfg: TrainConfig, info: DistInfo, dtype: str, compile_model: bool, pretrained: GPT | None
) -> GPT:
    """The FSDP model: built on meta, compiled per block, sharded, then materialised and initialised
    shard by shard (or from `pretrained`, whole weights copied into the shards)."""
    with torch.device("meta"):
        raw = GPT(cfg.model)
    twins = leaf_twins(raw)  # taken before sharding turns the parameters into DTensors
    raw.recompute_interval = cfg.recompute_interval
    policy = mixed_precision(dtype)
    for block in raw.transformer.h:
        if compile_model:
            block.compile(fullgraph=True)  # in place: the parameter names stay the checkpoints'
        fully_shard(block, mp_policy=policy)
    fully_shard(raw, mp_policy=policy)
    raw.to_empty(device=info.device)
    init_like_gpt(raw, twins)
    if pretrained is not None:
        wte = raw.transformer.wte.weight.full_tensor()  # one parameter gathered, not the model
        copy_shards(raw, raw.weights_from(pretrained, wte))
    # FSDP2 sets up its root at the first forward pass; do it now, or in-loop evaluation, which may
    # call the blocks first, would make each block a root of its own (eagerly: a 1-token graph
    # would only make the compiler treat the training shapes as dynamic)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        raw(torch.zeros(1, 1, dtype=torch.long, device=info.device))
    raw.reshard()  # the root keeps its parameters gathered after forward; the optimizer needs shards
    return raw


def leaf_twins(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """A meta-device copy of every module holding parameters of its own, in construction order
    (the order `GPT.__init__` builds them, which is also the order `apply` visits the leaves)."""
    return [
        (name, copy.deepcopy(module))
        for name, module in model.named_modules(remove_duplicate=False)
        if next(module.parameters(recurse=False), None) is not None
    ]


@torch.no_grad()
def init_like_gpt(raw: GPT, twins: list[tuple[str, nn.Module]]) -> None:
    """`GPT(cfg)`'s weights and random draws, into `raw`'s shards: first every leaf's constructor
    initialisation (`reset_parameters`), then `GPT._init_weights` over the leaves; each drawn whole
    on the host, one leaf at a time. A parameter that `_init_weights` leaves alone (LayerNorm) keeps
    its constructor value; the tied lm_head writes the token embedding last, as it does in `GPT`."""
    for name, twin in twins:
        _draw(raw, name, twin, twin.reset_parameters)
    for name, twin in twins:
        _draw(raw, name, twin, lambda twin=twin: raw._init_weights(twin))


def _draw(raw: nn.Module, name: str, twin: nn.Module, init: Callable[[], None]) -> None:
    """Run `init` on the host-side twin of leaf `name`; copy every parameter it wrote (its version
    counter moved) into this rank's shard of the same parameter of `raw`; free the twin again."""
    twin.to_empty(device="cpu")
    params = dict(twin.named_parameters(recurse=False))
    before = {k: p._version for k, p in params.items()}
    init()
    target = raw.get_submodule(name)
    for k, p in params.items():
        if p._version != before[k]:
            _copy_shard(getattr(target, k), p)
    twin.to_empty(device="meta")


def _copy_shard(param: torch.Tensor, full: torch.Tensor) -> None:
    """This rank's part of `full` into the DTensor `param` (no communication: every rank holds the
    same `full`)."""
    local = param.to_local()
    piece = distribute_tensor(full.to(local.device), param.device_mesh, param.placements, src_data_rank=None)
    local.copy_(piece.to_local())


@torch.no_grad()
def copy_shards(raw: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Whole weights (every rank holds them) into the sharded model, each rank its shards."""
    for name, param in raw.named_parameters():
        _copy_shard(param, state[name])
