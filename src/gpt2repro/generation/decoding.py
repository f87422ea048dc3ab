"""Decoding steps: one new token per slot after its cached ones, the one place decoding speed lives.

`model/gpt.py` is the architecture: prompts are read through its forward, and it is the reference a
step is tested against (in float64). A step (`Decoder`) is that arithmetic arranged for one token,
applied to a model from outside, and every entry point decodes through it: `generate`, the terminal
chat, the server's batch. At batch 1 a CPU step is bound by reading the weights, so what matters is
how its ~50 matmuls read them, and how little runs besides them (benchmarks/RESULTS.md).

- The matmuls run through a `Kernel` chosen per host, dtype and shape by timing the candidates on
  the model's own weights (`choose`): nn.Linear's F.linear; `split` (fp32, a few rows: the output
  features in one group per thread as one batched matmul, for MKL's one-core product on AMD EPYC);
  `mv` (bf16, one row: `addmv`'s matrix-vector kernel); `columns` (F.linear over weights stored
  transposed, MKL's column-streaming product: `prepare` lays an inference model out so, in place);
  `int8` (a model whose weights `for_decoding` rounded to int8: the rows read as int8, `int8.py`);
  `loop` (compiled steps on a CPU, `step_kernel`: one row in its own dtype, `cpu_kernels.py`). A
  kernel prepares each weight once (`Kernel.prepare`) and runs on what it prepared (`Kernel.run`).
- The attention only reads the cache: the new token attends to the cached keys and to its own key
  apart, joined in one softmax, and its keys and values are stored by one copy after the step. So
  the same function runs eagerly or compiled whole (`compiled=True`: every layer and the lm_head
  in one torch.compile graph, called from C++; written inside the graph, the cache would be copied
  whole every step). Logits agree with the forward's to float rounding, not bit for bit.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch._inductor.inductor_prims  # noqa: F401 - torch.ops.prims.inductor_force_stride_order
import torch.nn as nn
import torch.nn.functional as F

from ..model.gpt import GPT
from ..model.kvcache import KVCache
from ..model.precision import torch_dtype
from . import cpu_kernels
from .int8 import int8_linear, prepare_rows, round_to_int8
from .sampling import GenerateError

OPTIONS = {"cpp_wrapper": True}  # inductor: kernels called from C++, not from a Python wrapper
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
_INT8: weakref.WeakSet[GPT] = weakref.WeakSet()  # models whose weights are int8's values


def _transposed(weight: torch.Tensor) -> bool:
    return weight.dim() == 2 and weight.stride() == (1, weight.size(0))


def _linears(model: GPT) -> list[nn.Linear]:
    """Every Linear of the model in the order a step runs them, the lm_head last."""
    blocks = [(b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj) for b in model.transformer.h]
    return [m for block in blocks for m in block] + [model.lm_head]


def candidates(model: GPT, relayout: bool) -> list[Kernel]:
    """The kernels that can run this model's weights: as they are stored, or (`relayout`) after
    `prepare` stores them transposed."""
    weight = model.lm_head.weight
    if model in _INT8:
        return [INT8]
    if weight.device.type != "cpu":
        return [LINEAR]
    if _transposed(weight):  # laid out already: F.linear reads either layout
        return [COLUMNS]
    found = [LINEAR]
    threads = torch.get_num_threads()
    if threads > 1 and all(m.out_features % threads == 0 for m in _linears(model)):
        found.append(SPLIT)
    if weight.dtype == torch.bfloat16:
        found.append(MV)
    if relayout:
        found.append(COLUMNS)
    return found


def _timings(model: GPT, kernels: list[Kernel], rounds: int = 9) -> dict[str, float]:
    """Each kernel's best time for one row through the first block's matmuls and the lm_head (big
    enough to push the rest out of the caches, as a real step does), the kernels taking turns."""
    sample = _linears(model)[:4] + [model.lm_head]
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
    shapes = tuple(tuple(m.weight.shape) for m in _linears(model)[:4])
    key = (model.lm_head.weight.dtype, relayout, torch.get_num_threads(), shapes, model.config.vocab_size)
    if key not in _CHOSEN:
        times = _timings(model, found)
        times[found[0].name] *= MARGIN
        _CHOSEN[key] = min(times, key=times.get)
    return KERNELS[_CHOSEN[key]]


_PREPARED: weakref.WeakKeyDictionary[GPT, Kernel] = weakref.WeakKeyDictionary()


def _on_cpu(model: GPT) -> bool:
    return model.lm_head.weight.device.type == "cpu" and model not in _INT8


def step_kernel(model: GPT, compiled: bool) -> Kernel:
    """The kernel a Decoder runs: eager, `prepare`'s (else the fastest measured, `choose`). Compiled
    on a CPU, the weights as the model stores them: transposed (`columns`), through MKL's column
    product; int8's; else through the loop (`cpu_kernels`), whatever the dtype: inductor's own matmul
    runs a one-row product on one core, 2x slower (benchmarks/RESULTS.md, issue #42)."""
    w = model.lm_head.weight
    if not compiled or w.device.type != "cpu" or model in _INT8 or _transposed(w):
        return _PREPARED.get(model) or choose(model)
    return LOOP


def for_decoding(model: GPT, weight_dtype: str, compiled: bool = False) -> GPT:
    """The model with its weights in `weight_dtype` (fp32, bf16, fp16: cast; int8: every Linear
    weight rounded to int8 per output feature in place, decoded by the int8 kernel), `prepare`d for
    eager steps or (`compiled`) for compiled ones."""
    if weight_dtype != "int8":
        model = model.to(torch_dtype(weight_dtype))
        return prepare(model, LOOP if compiled and _on_cpu(model) else None)
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        raise GenerateError("--weight-dtype int8 needs a whole model, not FSDP's shards")
    round_to_int8([m.weight for m in _linears(model)])
    _INT8.add(model)
    return prepare(model)


def prepare(model: GPT, kernel: Kernel | None = None) -> GPT:
    """Make an inference model's decoding fast on this host, in place: choose its kernel (measured,
    unless given) and, for `columns`, store every fp32 or bf16 Linear weight as the transpose of a
    contiguous (in, out) tensor (the same tensors and values; tied weights stay tied: the token
    embedding too, whose lookups then read one strided row). For sampling, chat and serving only: a
    model being trained keeps nn.Linear's layout. Saving its weights with safetensors directly then
    needs `.contiguous()` (this project's writers do it). A prepared model stays as it was prepared
    unless a kernel is given."""
    if kernel is None and model in _PREPARED:
        return model
    kernel = kernel or choose(model, relayout=True)
    if kernel.columns:
        with torch.no_grad():
            for module in model.modules():
                w = module.weight if isinstance(module, nn.Linear) else None
                if w is not None and w.is_floating_point() and w.is_contiguous():
                    w.data = w.data.t().contiguous().t()
    _PREPARED[model] = kernel
    return model


def _attend(q, k_old, v_old, k_new, v_new, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the cached keys and values (slots, nh, length, hs) and the new
    token's own (slots, nh, 1, hs), the two parts in one softmax; `mask` (slots, 1, 1, length): the
    cached positions each slot holds (None: all). In fp32 whatever the weights' dtype (as SDPA
    accumulates), float64 in float64."""
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k_old, v_old, k_new, v_new = (t.to(wide) for t in (q, k_old, v_old, k_new, v_new))
    scale = q.size(-1) ** -0.5
    s_old = (q @ k_old.transpose(-1, -2)) * scale  # (slots, nh, 1, length)
    if mask is not None:
        s_old = s_old.masked_fill(~mask, float("-inf"))
    s_new = (q * k_new).sum(-1, keepdim=True) * scale  # (slots, nh, 1, 1)
    top = torch.maximum(s_old.amax(-1, keepdim=True), s_new)
    p_old, p_new = (s_old - top).exp(), (s_new - top).exp()
    return (p_old @ v_old + p_new * v_new) / (p_old.sum(-1, keepdim=True) + p_new)


_INT8_READY: weakref.WeakKeyDictionary[GPT, list] = weakref.WeakKeyDictionary()


def _prepared_weights(model: GPT, kernel: Kernel) -> list:
    """Each Linear's (weight as `kernel` prepared it, bias). An int8 model's, rounded once per model
    (not per prompt: rounding 124M weights takes longer than reading a prompt); its weights are for
    decoding only and do not change."""
    if kernel is INT8 and model in _INT8_READY:
        return _INT8_READY[model]
    weights = [(kernel.prepare(m.weight), m.bias) for m in _linears(model)]
    if kernel is INT8:
        _INT8_READY[model] = weights
    return weights


@dataclass(frozen=True)
class Layout:
    """What a step needs besides tensors (constants of a compiled step): the model's numbers, and the
    lengths of the 1-D tensors `_pack` joins into one, in the order the step reads them."""

    n_head: int
    vocab_size: int
    eps: float
    sizes: tuple[int, ...]
    scaled: bool  # each Linear's bias is followed by its rows' scales (int8)


def _pack(model: GPT, kernel: Kernel) -> tuple[Layout, tuple, list]:
    """Everything a step reads, as few tensors: a compiled step checks each of its arguments on every
    call (~200 tensors cost ~0.5 ms a token). (layout, (wte, wpe, vectors joined in one tensor, the
    Linear weights as `kernel` prepared them, in step order), the vectors apart for eager steps).
    The vectors: per block ln_1's weight and bias, then per Linear its bias (and its scales), ln_2's
    after the attention's two; then ln_f's, then the lm_head's scales."""
    t, prepared = model.transformer, _prepared_weights(model, kernel)
    vectors, matrices = [], []
    for i, block in enumerate(t.h):
        vectors += [block.ln_1.weight, block.ln_1.bias]
        for j, (weight, bias) in enumerate(prepared[4 * i : 4 * i + 4]):
            if j == 2:
                vectors += [block.ln_2.weight, block.ln_2.bias]
            matrices.append(weight[0] if kernel is INT8 else weight)
            vectors += [bias, weight[1]] if kernel is INT8 else [bias]
    vectors += [t.ln_f.weight, t.ln_f.bias]
    head = prepared[-1][0]
    matrices.append(head[0] if kernel is INT8 else head)
    vectors += [head[1]] if kernel is INT8 else []
    vectors = [v.detach() for v in vectors]
    cfg = model.config
    layout = Layout(
        cfg.n_head, cfg.vocab_size, cfg.layer_norm_epsilon, tuple(v.numel() for v in vectors), kernel is INT8
    )
    return layout, (t.wte.weight, t.wpe.weight, torch.cat(vectors), tuple(matrices)), vectors


def _step(layout: Layout, run: Callable, tensors: tuple, vectors, tok, positions, k_old, v_old, mask):
    """Logits (slots, vocab) of one new token per slot (tok: (slots, 1)) at `positions` (slots,),
    after the cached keys and values (n_layer, slots, nh, length, hs); and the new token's keys and
    values (n_layer, slots, nh, 1, hs). `tensors`: `_pack`'s; `vectors`: its vectors apart, or None
    to split them from the joined one; `run`: the kernel's matmul."""
    wte, wpe, joined, matrices = tensors
    vec, mat = iter(vectors or joined.split(layout.sizes)), iter(matrices)
    B, C, nh, eps = tok.size(0), wte.size(1), layout.n_head, layout.eps

    def linear(x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        w, b = next(mat), next(vec) if bias else None
        if vectors is None:  # compiled: x stored once; inductor would recompute what x is made of
            x = torch.ops.prims.inductor_force_stride_order(x, x.stride())  # (a LayerNorm...) per row
        return run(x, (w, next(vec)) if layout.scaled else w, b)

    x = F.embedding(tok, wte) + F.embedding(positions, wpe)[:, None]  # (B, 1, C)
    keys, values = [], []
    for i in range(k_old.size(0)):
        h = F.layer_norm(x, (C,), next(vec), next(vec), eps)
        q, k, v = linear(h).view(B, 3, nh, 1, C // nh).unbind(1)  # (B, nh, 1, hs)
        y = _attend(q, k_old[i], v_old[i], k, v, mask).to(q.dtype)  # (B, nh, 1, hs)
        x = x + linear(y.reshape(B, 1, C))
        h = F.layer_norm(x, (C,), next(vec), next(vec), eps)
        x = x + linear(F.gelu(linear(h), approximate="tanh"))
        keys.append(k)
        values.append(v)
    x = F.layer_norm(x, (C,), next(vec), next(vec), eps)
    return linear(x[:, -1], bias=False)[:, : layout.vocab_size], torch.stack(keys), torch.stack(values)


class Decoder:
    """Decoding steps for one model: `decoder(tokens (slots, 1), cache)` -> logits (slots, vocab),
    like `model.logits(model.hidden(tokens, cache)[:, -1])`, storing the tokens' keys and values in
    the cache and moving it on. Every slot must hold at least one token already; slots may be at
    different lengths (a server's batch). The kernel is `step_kernel`'s. `compiled`: the step compiled
    whole (its inputs packed by `_pack`), after
    compiling once per process for each kind of model and batch (tens of seconds each: one slot;
    several, at any lengths, masked), at the first step of each or at `warm`. FSDP's shards, whose
    hooks on the blocks gather them, and a subclass with a forward of its own decode through the
    model's forward."""

    def __init__(self, model: GPT, compiled: bool = False, kernel: Kernel | None = None):
        sharded = any(type(p).__name__ == "DTensor" for p in model.parameters())
        if compiled and sharded:
            raise GenerateError("compiled decoding steps need a whole model, not FSDP's shards")
        self.through_forward = sharded or type(model).hidden is not GPT.hidden  # (a model of its own)
        self.model = model
        if self.through_forward:  # nothing of the one step is used (FSDP's shards cannot be timed either)
            self.kernel, self.layout, self.tensors, self.vectors = None, None, (), []
        else:
            self.kernel = kernel or step_kernel(model, compiled)
            self.layout, self.tensors, self.vectors = _pack(model, self.kernel)
        self.compiled = torch.compile(_step, options=OPTIONS) if compiled else None

    @torch.no_grad()
    def __call__(self, tok: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if self.through_forward:  # FSDP: through the blocks, whose hooks gather the shards
            return self.model.logits(self.model.hidden(tok, cache)[:, -1])
        lengths = cache.lengths
        longest, aligned = int(lengths.max()), bool((lengths == lengths[0]).all())
        if int(lengths.min()) < 1 or longest >= cache.k.size(3):
            raise ValueError(f"a decoding step needs every slot at a length in 1..{cache.k.size(3) - 1}")
        positions = lengths.to(tok.device)
        k_old, v_old = cache.k[..., :longest, :], cache.v[..., :longest, :]
        keys = torch.arange(longest, device=tok.device)
        masked = not aligned or (self.compiled is not None and tok.size(0) > 1)  # (one graph for batches)
        mask = (keys < positions[:, None])[:, None, None] if masked else None  # (slots, 1, 1, length)
        args = (tok, positions, k_old, v_old, mask)
        if self.compiled is None or longest == 1:  # (torch.compile would fix a length of 1 apart)
            logits, k, v = _step(self.layout, self.kernel.run, self.tensors, self.vectors, *args)
        else:
            logits, k, v = self._compiled((self.layout, self.kernel.run, self.tensors, None, *args))
        cache.append(k, v)
        return logits

    def warm(self, slots: int) -> None:
        """Compile now (a server, before it takes requests) the steps a batch of up to `slots` slots
        runs: one slot, and several at different lengths."""
        if self.compiled is None:
            return
        device, dtype = self.model.lm_head.weight.device, self.model.transformer.wte.weight.dtype
        cache = KVCache.empty(self.model.config, slots, device, dtype)  # a batch is its first m slots
        for lengths in ([2], [2, 3])[: min(slots, 2)]:
            m = len(lengths)
            active = KVCache(cache.k[:, :m], cache.v[:, :m], torch.tensor(lengths))
            self(torch.zeros(m, 1, dtype=torch.long, device=device), active)

    def _compiled(self, args: tuple):
        tok, positions, k_old, v_old, mask = args[4:]
        for t in (k_old, v_old, mask):  # one graph for every cache length
            if t is not None:
                torch._dynamo.mark_dynamic(t, 3)
        if tok.size(0) > 1:  # and one for every number of slots past one
            for t, dim in ((tok, 0), (positions, 0), (k_old, 1), (v_old, 1), (mask, 0)):
                torch._dynamo.mark_dynamic(t, dim)
        try:
            return self.compiled(*args)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            raise GenerateError(
                f"compiling the decoding step failed ({cpu_kernels.first_line(e)}): decode without compiling"
            ) from e
