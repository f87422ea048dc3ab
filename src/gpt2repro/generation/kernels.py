"""How a decoding step's matmuls run (`decoding.py`): a `Kernel` per host, dtype and shape, chosen by
timing the candidates on the model's own weights (`choose`). At batch 1 a CPU step is bound by reading
the weights, so the kernels differ in how they read them (benchmarks/RESULTS.md).

The kernels: nn.Linear's F.linear; `split` (fp32, a few rows: the output features in one group
per thread as one batched matmul, for MKL's one-core product on AMD EPYC); `mv` (bf16, one row:
`addmv`'s matrix-vector kernel); `columns` (F.linear over weights stored transposed, MKL's
column-streaming product: `decoding.prepare` lays an inference model out so, in place); `int8` (a
model whose weights `decoding.for_decoding` rounded to int8: the rows read as int8, `int8.py`); `loop`
(compiled steps on a CPU, `decoding.step_kernel`: one row in its own dtype, `cpu_kernels.py`). A
kernel prepares each weight once (`Kernel.prepare`) and runs on what it prepared (`Kernel.run`).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model.gpt import GPT
from . import cpu_kernels
from .int8 import int8_linear, prepare_rows

MAX_SPLIT_ROWS = 32  # past this many rows a matmul is no longer bound by reading its weight


def _dense(weight: torch.Tensor) -> torch.Tensor:
    return weight


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def _grouped(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) as (threads, out / threads, in): one group of output features per thread."""
    groups = torch.get_num_threads()
    return weight.view(groups, weight.size(0) // groups, weight.size(1))


def _split(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear over grouped weights (`_grouped`), the groups as one batched matmul."""
    groups, per, in_features = w.shape
    rows = x.numel() // in_features
    if rows > MAX_SPLIT_ROWS:
        return F.linear(x, w.flatten(0, 1), bias)
    x2 = x.reshape(rows, in_features).t().expand(groups, in_features, rows)
    y = torch.bmm(w, x2).view(groups * per, rows).t()
    y = y if bias is None else y + bias
    return y.reshape(*x.shape[:-1], groups * per)


def _mv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One row through a matrix-vector product; more rows through F.linear."""
    if x.numel() != x.size(-1):
        return F.linear(x, weight, bias)
    row = x.reshape(-1)
    y = torch.mv(weight, row) if bias is None else torch.addmv(bias, weight, row)
    return y.view(*x.shape[:-1], -1)


@dataclass(frozen=True)
class Kernel:
    """How a decoder's matmuls run: `prepare` turns each Linear weight into what `run(x, prepared,
    bias)` reads; `columns`: over weights stored transposed (in, out) in memory."""

    name: str
    run: Callable[[torch.Tensor, Any, torch.Tensor | None], torch.Tensor]
    prepare: Callable[[torch.Tensor], Any] = _dense
    columns: bool = False


LINEAR = Kernel("linear", _linear)
COLUMNS = Kernel("columns", _linear, columns=True)
SPLIT = Kernel("split", _split, _grouped)
MV = Kernel("mv", _mv)
KERNELS = {k.name: k for k in (LINEAR, COLUMNS, SPLIT, MV)}  # for weights as they are
INT8 = Kernel("int8", int8_linear, prepare_rows)  # for weights rounded to int8 (`for_decoding`)
LOOP = Kernel("loop", cpu_kernels.loop_linear, torch.Tensor.contiguous)  # in compiled steps (`step_kernel`)
INT8_MODELS: weakref.WeakSet[GPT] = weakref.WeakSet()  # models whose weights are int8's values


def transposed(weight: torch.Tensor) -> bool:
    return weight.dim() == 2 and weight.stride() == (1, weight.size(0))


def linears(model: GPT) -> list[nn.Linear]:
    """Every Linear of the model in the order a step runs them, the lm_head last."""
    blocks = [(b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj) for b in model.transformer.h]
    return [m for block in blocks for m in block] + [model.lm_head]


def candidates(model: GPT, relayout: bool) -> list[Kernel]:
    """The kernels that can run this model's weights: as they are stored, or (`relayout`) after
    `prepare` stores them transposed."""
    weight = model.lm_head.weight
    if model in INT8_MODELS:
        return [INT8]
    if weight.device.type != "cpu":
        return [LINEAR]
    if transposed(weight):  # laid out already: F.linear reads either layout
        return [COLUMNS]
    found = [LINEAR]
    threads = torch.get_num_threads()
    if threads > 1 and all(m.out_features % threads == 0 for m in linears(model)):
        found.append(SPLIT)
    if weight.dtype == torch.bfloat16:
        found.append(MV)
    if relayout:
        found.append(COLUMNS)
    return found


def _timings(model: GPT, kernels: list[Kernel], rounds: int = 9) -> dict[str, float]:
    """Each kernel's best time for one row through the first block's matmuls and the lm_head (big
    enough to push the rest out of the caches, as a real step does), the kernels taking turns."""
    sample = linears(model)[:4] + [model.lm_head]
    x = {m: torch.randn(1, m.in_features, dtype=m.weight.dtype) for m in sample}
    ready = {}
    for k in kernels:
        weights = [m.weight.t().contiguous().t() if k.columns else m.weight for m in sample]
        ready[k.name] = [(m, k.prepare(w)) for m, w in zip(sample, weights)]
    best = dict.fromkeys(ready, float("inf"))
    with torch.no_grad():
        for _ in range(rounds):
            for k in kernels:
                t0 = time.perf_counter()
                for m, w in ready[k.name]:
                    k.run(x[m], w, m.bias)
                best[k.name] = min(best[k.name], time.perf_counter() - t0)
    return best


_CHOSEN: dict[tuple, str] = {}  # measured once per process for each kind of model and host setting
MARGIN = 0.9  # another kernel than nn.Linear's is taken only this much faster: a busy host's noise


def choose(model: GPT, relayout: bool = False) -> Kernel:
    """The fastest kernel for this model's weights on this host, measured (once per process for each
    dtype, layout, thread count and shape); nn.Linear's own unless another is clearly faster."""
    found = candidates(model, relayout)
    if len(found) == 1:
        return found[0]
    shapes = tuple(tuple(m.weight.shape) for m in linears(model)[:4])
    key = (model.lm_head.weight.dtype, relayout, torch.get_num_threads(), shapes, model.config.vocab_size)
    if key not in _CHOSEN:
        times = _timings(model, found)
        times[found[0].name] *= MARGIN
        _CHOSEN[key] = min(times, key=times.get)
    return KERNELS[_CHOSEN[key]]
