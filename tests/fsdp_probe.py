"""Run under torchrun by tests/test_fsdp.py: builds FSDP models the way training does
(`parallelize.build_model`) and writes what it measured to OUT/rankN.json (a file each: two ranks'
prints may interleave).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_probe.py MODES OUT
MODES, comma-separated, run in that order in one launch (torchrun's start-up costs seconds a launch):
init (weights and random state against one process's GPT(cfg)), memory (what a rank allocates while
building: first, as it reads the process's peak), bf16 (the mixed-precision policy's dtypes), compile
(per-block graphs). OUT/rankN.json holds {mode: report}."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from gpt2repro.config.presets import train_config
from gpt2repro.model.gpt import GPT
from gpt2repro.model.precision import autocast
from gpt2repro.parallel.distributed import setup, teardown
from gpt2repro.parallel.parallelize import build_model

TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64", "seq_len=32"]
TINY += ["micro_batch_size=4", "total_batch_size=256", "fsdp=true", "seed=1234"]


def config(*overrides):
    return train_config("cpu-tiny", [*TINY, *overrides])


def built(cfg, info, dtype="fp32", compile_model=False, pretrained=None):
    """(sharded model, the random state after building it)."""
    torch.manual_seed(cfg.seed)
    raw, _ = build_model(cfg, info, dtype, compile_model, pretrained)
    return raw, torch.get_rng_state()


def init(info) -> dict:
    """Each case's parameters that differ from one process's, and whether the random state after
    building equals one process's."""
    torch.manual_seed(7)
    base = GPT(config().model)  # pretrained weights without the chat rows, unpadded
    cases = {
        "padded": (config("model.vocab_multiple=64"), None),
        "chat": (config("model.chat=true", "model.vocab_multiple=64"), None),
        "pretrained": (config("model.chat=true", "model.vocab_multiple=64"), base),
    }
    out = {}
    for name, (cfg, pretrained) in cases.items():
        raw, rng = built(cfg, info, pretrained=pretrained)
        torch.manual_seed(cfg.seed)
        ref = GPT(cfg.model)
        if pretrained is not None:
            ref.copy_weights_from(pretrained)
        out[name] = {
            "differ": [
                n for n, p in raw.named_parameters() if not torch.equal(p.full_tensor(), ref.get_parameter(n))
            ],
            "params": len(list(raw.named_parameters())),
            "rng_equal": torch.equal(rng, torch.get_rng_state()),
            "tied": raw.lm_head.weight is raw.transformer.wte.weight,
        }
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory(info) -> dict:
    """Peak resident memory added by building a 466 MB model up to its initialised shards (the
    build's first forward pass, FSDP gathering one block at a time, comes after), the model's
    bytes, its largest parameter's, and the devices its parameters were on when FSDP sharded them."""
    from gpt2repro.parallel import parallelize

    seen, fully_shard, init_like_gpt = (
        {"sharded_on": set()},
        parallelize.fully_shard,
        parallelize.init_like_gpt,
    )

    def sharding(module, **kw):
        seen["sharded_on"].update(p.device.type for p in module.parameters())
        return fully_shard(module, **kw)

    def initialising(*args):
        init_like_gpt(*args)
        seen["initialised"] = peak_rss_bytes()

    parallelize.fully_shard, parallelize.init_like_gpt = sharding, initialising
    cfg = config("model.n_layer=16", "model.n_head=12", "model.n_embd=768", "model.vocab_size=4096")
    before = rss_bytes()
    try:
        raw, _ = built(cfg, info)
    finally:  # the modes after this one build with the real functions
        parallelize.fully_shard, parallelize.init_like_gpt = fully_shard, init_like_gpt
    sizes = [p.numel() * p.element_size() for p in raw.parameters()]
    return {
        "growth": seen["initialised"] - before,
        "growth_with_first_forward": peak_rss_bytes() - before,
        "model": sum(sizes),
        "largest": max(sizes),
        "sharded_on": sorted(seen["sharded_on"]),
    }


def recording(seen: dict) -> dict:
    """Wrap FSDP's two collectives to note the dtype of every tensor they send; the originals."""
    originals = {name: getattr(dist, name) for name in ("all_gather_single", "reduce_scatter_single")}

    def wrap(name, original):
        def wrapper(*args, **kw):
            sent = (
                args[1] if len(args) > 1 else kw["input"]
            )  # (all-gather's positional, reduce-scatter's keyword)
            seen.setdefault(name, set()).add(str(sent.dtype))
            return original(*args, **kw)

        return wrapper

    for name, original in originals.items():
        setattr(dist, name, wrap(name, original))
    return originals


def step(raw, cfg, dtype):
    x = torch.randint(0, cfg.model.vocab_size, (2, cfg.seq_len))
    with autocast(torch.device("cpu"), dtype):
        _, loss = raw(x, x)
    loss.backward()


def bf16(info) -> dict:
    """The dtypes of a bf16 and an fp32 run: of the weights a block computes with, of what FSDP
    all-gathers and reduce-scatters, and of the sharded parameters and their gradients."""
    out = {}
    for dtype in ("bf16", "fp32"):
        cfg = config(f"dtype={dtype}")
        raw, _ = built(cfg, info, dtype)
        seen: dict = {}
        originals = recording(seen)
        hook = raw.transformer.h[0].attn.c_attn.register_forward_pre_hook(
            lambda m, args, seen=seen: seen.setdefault("computes_with", set()).add(str(m.weight.dtype))
        )
        step(raw, cfg, dtype)
        hook.remove()
        seen["sharded"] = {str(p.dtype) for p in raw.parameters()}
        seen["grads"] = {str(p.grad.dtype) for p in raw.parameters()}
        out[dtype] = {k: sorted(v) for k, v in seen.items()}
        for name, original in originals.items():
            setattr(dist, name, original)
    return out


def compile_blocks(info) -> dict:
    """Graphs compiled and graph breaks over three training steps of a model compiled per block."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = config("compile=true", "activation_checkpointing=full")
    raw, _ = built(cfg, info, compile_model=True)
    graphs = []
    for _ in range(3):
        step(raw, cfg, "fp32")
        graphs.append(counters["stats"]["unique_graphs"])
    return {
        "graphs": graphs,
        "breaks": sum(counters["graph_break"].values()),
        "blocks_compiled": [b._compiled_call_impl is not None for b in raw.transformer.h],
        "root_compiled": raw._compiled_call_impl is not None,
    }


if __name__ == "__main__":
    info = setup("cpu")
    try:
        modes, out = sys.argv[1].split(","), Path(sys.argv[2])
        probes = {"init": init, "memory": memory, "bf16": bf16, "compile": compile_blocks}
        result = {mode: {"rank": info.rank, **probes[mode](info)} for mode in modes}
        (out / f"rank{info.rank}.json").write_text(json.dumps(result))
    finally:
        teardown()
