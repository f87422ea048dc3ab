"""Decoding steps: one new token per slot after its cached ones, the one place decoding speed lives.

`model/gpt.py` is the architecture: prompts are read through its forward, and it is the reference a
step is tested against (in float64). A step (`Decoder`) is that arithmetic arranged for one token,
applied to a model from outside, and every entry point decodes through it: `generate`, the terminal
chat, the server's batch. At batch 1 a CPU step is bound by reading the weights, so what matters is
how its ~50 matmuls read them, and how little runs besides them (benchmarks/RESULTS.md).

- The matmuls run through a `Kernel` (`kernels.py`), chosen per host, dtype and shape by timing the
  candidates on the model's own weights, and prepared once per weight.
- The attention only reads the cache: the new token attends to the cached keys and to its own key
  apart, joined in one softmax, and its keys and values are stored by one copy after the step. So
  the same function runs eagerly or compiled whole (`compiled=True`: every layer and the lm_head
  in one torch.compile graph, called from C++; written inside the graph, the cache would be copied
  whole every step). Logits agree with the forward's to float rounding, not bit for bit.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch._inductor.inductor_prims  # noqa: F401 - torch.ops.prims.inductor_force_stride_order
import torch.nn as nn
import torch.nn.functional as F

from ..model.gpt import GPT
from ..model.kvcache import KVCache
from ..model.precision import torch_dtype
from . import cpu_kernels
from .int8 import round_to_int8
from .kernels import INT8, INT8_MODELS, LOOP, Kernel, choose, linears, transposed
from .sampling import GenerateError

OPTIONS = {"cpp_wrapper": True}  # inductor: kernels called from C++, not from a Python wrapper
_PREPARED: weakref.WeakKeyDictionary[GPT, Kernel] = weakref.WeakKeyDictionary()


def _on_cpu(model: GPT) -> bool:
    return model.lm_head.weight.device.type == "cpu" and model not in INT8_MODELS


def _sharded(model: GPT) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def step_kernel(model: GPT, compiled: bool) -> Kernel:
    """The kernel a Decoder runs: eager, `prepare`'s (else the fastest measured, `choose`). Compiled
    on a CPU, the weights as the model stores them: transposed (`columns`), through MKL's column
    product; int8's; else through the loop (`cpu_kernels`), whatever the dtype: inductor's own matmul
    runs a one-row product on one core, 2x slower (benchmarks/RESULTS.md, issue #42)."""
    w = model.lm_head.weight
    if not compiled or w.device.type != "cpu" or model in INT8_MODELS or transposed(w):
        return _PREPARED.get(model) or choose(model)
    return LOOP


def for_decoding(model: GPT, weight_dtype: str, compiled: bool = False) -> GPT:
    """The model with its weights in `weight_dtype` (fp32, bf16, fp16: cast; int8: every Linear
    weight rounded to int8 per output feature in place, decoded by the int8 kernel), `prepare`d for
    eager steps or (`compiled`) for compiled ones: on a CPU its Linear weights then made views of one
    buffer (`_join_weights`)."""
    if weight_dtype != "int8":
        model = model.to(torch_dtype(weight_dtype))
        if not (compiled and _on_cpu(model)):
            return prepare(model)
        if not _sharded(model):  # (FSDP's shards are refused by compiled steps: `Decoder`)
            _join_weights(model)
        return prepare(model, LOOP)
    if _sharded(model):
        raise GenerateError("--weight-dtype int8 needs a whole model, not FSDP's shards")
    round_to_int8([m.weight for m in linears(model)])
    INT8_MODELS.add(model)
    return prepare(model, INT8)


_JOINED: weakref.WeakKeyDictionary[GPT, torch.Tensor] = weakref.WeakKeyDictionary()  # (`_join_weights`)


def _one_buffer(parts: Iterable[torch.Tensor], numel: int, like: torch.Tensor) -> tuple[torch.Tensor, list]:
    """`parts` (`numel` values in all, of `like`'s dtype and device) copied one after another into one
    new buffer, and their views of it: a compiled step takes the buffer whole, one argument to check
    per call instead of ~50. `parts` may make each part as it is asked for (one in memory at a time)."""
    buffer = torch.empty(numel, dtype=like.dtype, device=like.device)
    views, start = [], 0
    with torch.no_grad():
        for part in parts:
            views.append(buffer[start : start + part.numel()].view_as(part))
            views[-1].copy_(part)
            start += part.numel()
    return buffer, views


def _join_weights(model: GPT) -> None:
    """Every Linear weight of a model decoded by compiled steps made a view of one buffer
    (`_one_buffer`), in step order: the same values; tied weights stay tied. For decoding only:
    saving these weights with safetensors then needs `.clone()`."""
    modules = linears(model)
    numel = sum(m.weight.numel() for m in modules)
    _JOINED[model], views = _one_buffer((m.weight for m in modules), numel, modules[0].weight)
    for m, view in zip(modules, views):
        m.weight.data = view


def _views_of(buffer: torch.Tensor | None, matrices: list[torch.Tensor], shapes: list[tuple]) -> bool:
    """Whether `matrices` are `buffer`'s consecutive views of `shapes`, in order, and all of it."""
    if buffer is None:
        return False
    start = 0
    for m, shape in zip(matrices, shapes, strict=True):
        if m.dtype != buffer.dtype or not m.is_contiguous() or m.shape != shape:
            return False
        if m.data_ptr() != buffer.data_ptr() + start * m.element_size():
            return False
        start += m.numel()
    return start == buffer.numel()


def prepare(model: GPT, kernel: Kernel | None = None) -> GPT:
    """Make an inference model's decoding fast on this host, in place: choose its kernel (measured,
    unless given) and, for `columns`, store every fp32 or bf16 Linear weight as the transpose of a
    contiguous (in, out) tensor (the same tensors and values; tied weights stay tied: the token
    embedding too, whose lookups then read one strided row). For sampling, chat and serving only: a
    model being trained keeps nn.Linear's layout. Saving its weights with safetensors directly then
    needs `.contiguous()` (this project's writers do it; weights joined for compiled steps need
    `.clone()`). A prepared model stays as it was prepared unless a kernel is given."""
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


_INT8_READY: weakref.WeakKeyDictionary[GPT, tuple] = weakref.WeakKeyDictionary()


def _prepared_weights(model: GPT, kernel: Kernel) -> tuple[list, torch.Tensor | None]:
    """Each Linear's (weight as `kernel` prepared it, bias), and the buffer they may be views of
    (`_join_weights`'). An int8 model's are rounded once per model (not per prompt: rounding 124M
    weights takes longer than reading a prompt), its int8 rows laid out as views of one buffer; its
    weights are for decoding only and do not change."""
    if kernel is not INT8:
        return [(kernel.prepare(m.weight), m.bias) for m in linears(model)], _JOINED.get(model)
    if model not in _INT8_READY:
        modules, scales = linears(model), []

        def rows() -> Iterator[torch.Tensor]:  # one matrix's at a time: not every matrix's twice
            for m in modules:
                q, scale = kernel.prepare(m.weight)
                scales.append(scale)
                yield q

        numel = sum(m.weight.numel() for m in modules)
        joined, views = _one_buffer(rows(), numel, torch.empty(0, dtype=torch.int8))
        _INT8_READY[model] = [((v, s), m.bias) for v, s, m in zip(views, scales, modules)], joined
    return _INT8_READY[model]


@dataclass(frozen=True)
class Layout:
    """What a step needs besides tensors (constants of a compiled step): the model's numbers. The
    lengths of what `_pack` joins follow from the tensors' shapes (`_sizes`, `_shapes`), so a
    compiled step checks no constant per vector or matrix on each call."""

    n_head: int
    vocab_size: int
    eps: float
    scaled: bool  # each Linear's bias is followed by its rows' scales (int8)


def _shapes(n_layer: int, C: int, rows: int) -> list[tuple[int, int]]:
    """The Linear weights' shapes in step order (GPT-2's blocks, then the lm_head's `rows`)."""
    return [(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)] * n_layer + [(rows, C)]


def _sizes(n_layer: int, C: int, rows: int, scaled: bool) -> list[int]:
    """The lengths of the vectors `_pack` joins, in its order."""
    linear = (lambda n: [n, n]) if scaled else (lambda n: [n])
    block = [C, C, *linear(3 * C), *linear(C), C, C, *linear(4 * C), *linear(C)]
    return block * n_layer + [C, C] + ([rows] if scaled else [])


def _pack(model: GPT, kernel: Kernel, compiled: bool) -> tuple[Layout, tuple, list]:
    """Everything a step reads, as few tensors: a compiled step checks each of its arguments on every
    call. (layout, (wte, wpe, the vectors joined in one tensor, the Linear weights as `kernel`
    prepared them in step order: for compiled steps the one buffer they are views of, where they are
    (`_prepared_weights`)), the vectors apart for eager steps). The vectors: per block ln_1's weight and bias,
    then per Linear its bias (and its scales), ln_2's after the attention's two; then ln_f's, then
    the lm_head's scales."""
    t, (prepared, buffer) = model.transformer, _prepared_weights(model, kernel)
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
    cfg, rows = model.config, t.wte.weight.size(0)
    assert [v.numel() for v in vectors] == _sizes(cfg.n_layer, cfg.n_embd, rows, kernel is INT8)
    layout = Layout(cfg.n_head, cfg.vocab_size, cfg.layer_norm_epsilon, kernel is INT8)
    if not _views_of(buffer, matrices, _shapes(cfg.n_layer, cfg.n_embd, rows)):
        _JOINED.pop(model, None)  # its weights laid out or cast since: the old buffer is not kept
        buffer = None
    weights = buffer if compiled and buffer is not None else tuple(matrices)
    return layout, (t.wte.weight, t.wpe.weight, torch.cat(vectors), weights), vectors


def _step(layout: Layout, run: Callable, tensors: tuple, vectors, tok, positions, k_old, v_old, mask):
    """Logits (slots, vocab) of one new token per slot (tok: (slots, 1)) at `positions` (slots,),
    after the cached keys and values (n_layer, slots, nh, length, hs); and the new token's keys and
    values (n_layer, slots, nh, 1, hs). `tensors`: `_pack`'s; `vectors`: its vectors apart, or None
    to split them from the joined one; `run`: the kernel's matmul."""
    wte, wpe, joined, matrices = tensors
    B, C, nh, eps, n_layer = tok.size(0), wte.size(1), layout.n_head, layout.eps, k_old.size(0)
    vec = iter(vectors or joined.split(_sizes(n_layer, C, wte.size(0), layout.scaled)))
    if isinstance(matrices, torch.Tensor):  # one buffer: its views, in step order
        shapes = _shapes(n_layer, C, wte.size(0))
        matrices = [m.view(shape) for m, shape in zip(matrices.split([r * c for r, c in shapes]), shapes)]
    mat = iter(matrices)

    def linear(x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        w, b = next(mat), next(vec) if bias else None
        if vectors is None:  # compiled: x stored once; inductor would recompute what x is made of
            x = torch.ops.prims.inductor_force_stride_order(x, x.stride())  # (a LayerNorm...) per row
        return run(x, (w, next(vec)) if layout.scaled else w, b)

    x = F.embedding(tok, wte) + F.embedding(positions, wpe)[:, None]  # (B, 1, C)
    keys, values = [], []
    for i in range(n_layer):
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
        sharded = _sharded(model)
        if compiled and sharded:
            raise GenerateError("compiled decoding steps need a whole model, not FSDP's shards")
        self.through_forward = sharded or type(model).hidden is not GPT.hidden  # (a model of its own)
        self.model = model
        if self.through_forward:  # nothing of the one step is used (FSDP's shards cannot be timed either)
            self.kernel, self.layout, self.tensors, self.vectors = None, None, (), []
        else:
            self.kernel = kernel or step_kernel(model, compiled)
            self.layout, self.tensors, self.vectors = _pack(model, self.kernel, compiled)
        self.compiled = (
            torch.compile(_step, options=OPTIONS, recompile_limit=cpu_kernels.RECOMPILE_LIMIT)
            if compiled
            else None
        )

    @torch.no_grad()
    def __call__(self, tok: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if self.through_forward:  # FSDP: through the blocks, whose hooks gather the shards
            return self.model.logits(self.model.hidden(tok, cache)[:, -1])
        lengths = cache.lengths.tolist()  # (Python numbers: each tensor op here costs ~5 µs a token)
        shortest, longest = min(lengths), max(lengths)
        if shortest < 1 or longest >= cache.k.size(3):
            raise ValueError(f"a decoding step needs every slot at a length in 1..{cache.k.size(3) - 1}")
        positions = cache.lengths.to(tok.device)
        k_old, v_old = cache.k[..., :longest, :], cache.v[..., :longest, :]
        # a mask where slots differ in length, and for every compiled batch (one graph for batches)
        masked = shortest < longest or (self.compiled is not None and tok.size(0) > 1)
        keys = torch.arange(longest, device=tok.device) if masked else None
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
