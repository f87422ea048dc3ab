"""The one decoding implementation (generation/decoding.py) against the model's plain forward, in
float64: every kernel, slots at one length and at different ones, eager and compiled; the kernel
chosen by measurement; the layout `prepare` applies from outside."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2repro.config.schema import model_config
from gpt2repro.generation import decoding, kernels
from gpt2repro.generation.generate import generate
from gpt2repro.generation.sampling import GREEDY, GenerateError
from gpt2repro.model.gpt import GPT
from gpt2repro.model.kvcache import KVCache


@pytest.fixture(scope="module")
def model64():
    torch.manual_seed(0)
    return GPT(model_config("tiny", n_layer=2, vocab_multiple=64)).double().eval()


def _decode(model, decoder, prompts, steps):
    """Each slot prefilled alone through the forward, then `steps` greedy steps together: the
    sequences, each step's logits, and the cache."""
    cache = KVCache.empty(model.config, len(prompts), "cpu", model.lm_head.weight.dtype)
    with torch.no_grad():
        logits = torch.cat(
            [model.logits(model.hidden(p, cache.slot(i))[:, -1]) for i, p in enumerate(prompts)]
        )
    seqs, seen = [p[0].tolist() for p in prompts], []
    for _ in range(steps):
        tok = logits.argmax(-1, keepdim=True)
        for s, t in zip(seqs, tok[:, 0].tolist()):
            s.append(t)
        logits = decoder(tok, cache)
        seen.append(logits)
    return seqs, seen, cache


def _reference(model, seqs, steps):
    """Every step's logits and the keys/values, by the plain forward over each whole sequence."""
    logits, caches = [], []
    with torch.no_grad():
        for s in seqs:
            cache = KVCache.empty(model.config, 1, "cpu", torch.float64)
            h = model.hidden(torch.tensor([s]), cache)
            logits.append(model.logits(h[0, -steps:]))
            caches.append(cache)
    return torch.stack(logits, 1), caches


ALL_KERNELS = {**kernels.KERNELS, "loop": kernels.LOOP}  # (int8's: tests/test_int8.py)


@pytest.mark.parametrize("lengths", [(7,), (5, 5), (3, 9)])
@pytest.mark.parametrize("kernel", sorted(ALL_KERNELS))
def test_a_decoding_step_is_the_forwards_arithmetic_in_float64(model64, kernel, lengths):
    """Each kernel's steps give the plain forward's logits and keys/values to float64 rounding, for
    one slot and for slots at one length or at different ones (the loop reads one row only)."""
    model = GPT(model64.config).double().eval()
    model.load_state_dict(model64.state_dict())
    kind = ALL_KERNELS[kernel]
    decoding.prepare(model, kind)
    torch.manual_seed(1)
    prompts = [torch.randint(0, model.config.vocab_size, (1, n)) for n in lengths]
    with mock.patch("torch.get_num_threads", return_value=2):  # split's groups, whatever the host
        decoder = decoding.Decoder(model)
    seqs, seen, cache = _decode(model, decoder, prompts, steps=6)
    assert decoder.kernel is kind and model.lm_head.weight.is_contiguous() != kind.columns
    expected, caches = _reference(model64, seqs, steps=6)
    torch.testing.assert_close(torch.stack(seen), expected, rtol=0, atol=1e-12)
    for i, alone in enumerate(caches):
        n = int(alone.lengths[0])
        assert cache.lengths[i] == n
        torch.testing.assert_close(cache.k[:, i, :, :n], alone.k[:, 0, :, :n], rtol=0, atol=1e-12)
        torch.testing.assert_close(cache.v[:, i, :, :n], alone.v[:, 0, :, :n], rtol=0, atol=1e-12)


def test_compiled_steps_are_the_forwards_arithmetic_in_one_graph_for_every_length(model64):
    """The step compiled whole: the plain forward's logits to float64 rounding at every step, and
    one graph for all cache lengths (no recompiling per token); `generate`'s greedy tokens."""
    from torch._dynamo.utils import counters

    torch.manual_seed(3)
    prompts = [torch.randint(0, model64.config.vocab_size, (1, 9)) for _ in range(2)]
    decoder = decoding.Decoder(model64, compiled=True, kernel=kernels.LINEAR)
    graphs = []

    def counted(tok, cache):
        logits = decoder(tok, cache)
        graphs.append(counters["stats"]["unique_graphs"])
        return logits

    seqs, seen, _ = _decode(model64, counted, prompts, steps=12)
    assert graphs[1:] == [graphs[0]] * 11  # lengths 10..21: no new graph
    expected, _ = _reference(model64, seqs, steps=12)
    torch.testing.assert_close(torch.stack(seen), expected, rtol=0, atol=1e-12)
    prompt = torch.cat(prompts)
    assert torch.equal(
        generate(model64, prompt, 10, sampling=GREEDY, compiled=True),
        generate(model64, prompt, 10, sampling=GREEDY),
    )


def test_the_kernel_is_the_fastest_measured_and_measured_once(model64):
    """`choose` times the candidates on the model's weights and keeps the fastest, once per process
    for a kind of model."""
    model = GPT(model_config("tiny", n_layer=1, n_embd=96, n_head=2, vocab_multiple=64)).eval()  # new kind
    fake = {"linear": 3.0, "split": 1.0, "columns": 2.0}
    with (
        mock.patch("torch.get_num_threads", return_value=2),
        mock.patch.object(kernels, "_timings") as timed,
    ):
        timed.side_effect = lambda m, found: {k.name: fake[k.name] for k in found}
        assert kernels.choose(model, relayout=True) is kernels.SPLIT
        assert kernels.choose(model, relayout=True) is kernels.SPLIT
        assert timed.call_count == 1
        assert [k.name for k in timed.call_args.args[1]] == ["linear", "split", "columns"]
        assert kernels.choose(model) is kernels.SPLIT  # without relayout: linear or split
        assert [k.name for k in timed.call_args.args[1]] == ["linear", "split"]
    fake["split"] = 2.8  # less than 10% faster than nn.Linear's: not worth the noise
    with (
        mock.patch("torch.get_num_threads", return_value=2),
        mock.patch.object(kernels, "_timings") as timed,
    ):
        timed.side_effect = lambda m, found: {k.name: fake[k.name] for k in found}
        kernels._CHOSEN.clear()
        assert kernels.choose(model) is kernels.LINEAR
    real = kernels._timings(model, [kernels.LINEAR, kernels.COLUMNS], rounds=2)
    assert set(real) == {"linear", "columns"} and all(0 < t < 1 for t in real.values())


def test_prepare_lays_the_weights_out_from_outside_keeping_every_value_and_tie():
    """`columns`: every Linear weight the same tensor and values, stored as the transpose of a
    contiguous (in, out) tensor, the lm_head still the embedding; other kernels change nothing."""
    torch.manual_seed(0)
    model = GPT(model_config("tiny", n_layer=2)).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    assert decoding.prepare(model, kernels.COLUMNS) is model
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name, p in model.named_parameters():
        assert p is params[name] and torch.equal(p, before[name])
        assert (p.dim() == 2 and p.stride() == (1, p.size(0))) == (
            name in linears or name == "transformer.wte.weight"
        ), name
    assert model.lm_head.weight is model.transformer.wte.weight
    assert decoding.Decoder(model).kernel is kernels.COLUMNS
    other = GPT(model_config("tiny", n_layer=1)).eval()
    decoding.prepare(other, kernels.SPLIT)
    assert all(p.is_contiguous() for p in other.parameters())


def test_decoding_refuses_what_it_cannot_do_in_one_line(model64):
    """A slot with nothing cached, or no room; compiled without the cache; a C++ compiler that does
    not work (a one-line GenerateError naming the cause, not inductor's traceback)."""
    cache = KVCache.empty(model64.config, 2, "cpu", torch.float64)
    step = decoding.Decoder(model64)
    for lengths in ([0, 4], [3, model64.config.block_size]):
        cache.lengths[:] = torch.tensor(lengths)
        with pytest.raises(ValueError, match="every slot at a length in 1.."):
            step(torch.zeros(2, 1, dtype=torch.long), cache)
    prompt = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(GenerateError, match="need use_cache=True"):
        generate(model64, prompt, 4, sampling=GREEDY, compiled=True, use_cache=False)
    odd = GPT(model_config("tiny", n_embd=48, n_head=3)).eval()
    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",)}):
        with pytest.raises(
            GenerateError, match="compiling the decoding step failed .*decode without compiling"
        ):
            generate(odd, prompt, 4, sampling=GREEDY, compiled=True)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_compiled_steps_take_the_weights_as_one_buffer_and_eager_ones_as_its_views(dtype):
    """A compiled step checks each argument on every call: it takes the Linear weights (int8's rows)
    as the one buffer they are views of, in step order; the model keeps its values and its tie."""
    model = GPT(model_config("tiny", n_layer=2)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model = decoding.for_decoding(model, dtype, compiled=True)
    cast = torch.float32 if dtype == "int8" else decoding.torch_dtype(dtype)
    if dtype != "int8":  # (int8: the weights keep int8's values, rounded in place)
        assert all(torch.equal(v, before[k].to(cast)) for k, v in model.state_dict().items())
    assert model.lm_head.weight is model.transformer.wte.weight
    buffer, eager = decoding.Decoder(model, compiled=True).tensors[3], decoding.Decoder(model).tensors[3]
    assert isinstance(buffer, torch.Tensor) and isinstance(eager, tuple) and len(eager) == 2 * 4 + 1
    assert buffer.dtype == (torch.int8 if dtype == "int8" else cast) and buffer.numel() == sum(
        m.numel() for m in eager
    )
    starts = [m.data_ptr() - buffer.data_ptr() for m in eager]
    assert starts == [sum(m.numel() for m in eager[:i]) * buffer.element_size() for i in range(len(eager))]
    if dtype == "int8":
        return
    with mock.patch("torch.get_num_threads", return_value=1):  # views of other shapes: (1, out, in)
        grouped = decoding.Decoder(model, compiled=True, kernel=kernels.SPLIT)
    assert isinstance(grouped.tensors[3], tuple) and model not in decoding._JOINED  # (not held twice)
    decoding._JOINED[model] = buffer
    decoding.prepare(model, kernels.COLUMNS)  # laid out anew: no longer views of it, each apart
    assert isinstance(decoding.Decoder(model, compiled=True).tensors[3], tuple)
    if dtype == "fp32":  # then rounded to int8: decoded by int8's kernel, not the loop it had
        assert decoding.Decoder(decoding.for_decoding(model, "int8")).kernel is kernels.INT8


def test_compiled_steps_stay_compiled_past_torchs_recompile_limit():
    """Every kind of model compiles its own graph of the one step function: past torch's limit of
    recompiles (8 by default; 1 here) the steps would silently run uncompiled. (Dynamo's graphs run
    by its eager backend here: the limit is Dynamo's, and inductor's C++ would take ~6 s a kind.)"""
    prompt = torch.zeros(1, 3, dtype=torch.long)
    entries = lambda: len(torch._dynamo.eval_frame._debug_get_cache_entry_list(decoding._step.__code__))  # noqa: E731
    real = torch.compile
    eager = lambda fn, **kw: real(fn, **{**kw, "backend": "eager", "options": None})  # noqa: E731
    with torch._dynamo.config.patch(recompile_limit=1), mock.patch.object(decoding.torch, "compile", eager):
        for width in (24, 40):  # two kinds of model no other test uses
            before = entries()
            model = GPT(model_config("tiny", n_embd=width, n_head=2, n_layer=1)).eval()
            generate(model, prompt, 3, sampling=GREEDY, compiled=True)
            assert entries() == before + 1


@pytest.mark.parametrize("shape", [(1, 1, 64), (8, 1, 64), (3, 5, 64), (40, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_the_split_kernel_is_x_wt_plus_b_over_groups_of_output_features(shape, bias):
    """A few rows through one batched matmul over a group of output features per thread (past
    MAX_SPLIT_ROWS rows, F.linear): x W^T + b against float64."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 96, bias=bias)
    x = torch.randn(shape)
    expected = F.linear(
        x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double()
    )
    with torch.no_grad(), mock.patch("torch.get_num_threads", return_value=2):
        w = kernels.SPLIT.prepare(layer.weight)
        with mock.patch("torch.bmm", wraps=torch.bmm) as bmm:
            y = kernels.SPLIT.run(x, w, layer.bias)
    assert w.shape == (2, 48, 64) and bmm.called == (x.numel() // 64 <= kernels.MAX_SPLIT_ROWS)
    assert y.shape == (*shape[:-1], 96)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_one_row_bf16_mv_kernel_is_a_matrix_vector_product_rounded_once(bias):
    """One bf16 row through torch.addmv (faster than the oneDNN matmul at one row where measured so),
    accumulating in fp32: every output is the exact product rounded once to bf16 (within 2^-8)."""
    torch.manual_seed(0)
    layer = nn.Linear(768, 2304, bias=bias).to(torch.bfloat16)
    if bias:
        nn.init.normal_(layer.bias)
    x = torch.randn(1, 1, 768, dtype=torch.bfloat16)
    exact = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    with torch.no_grad(), mock.patch("torch.addmv", wraps=torch.addmv) as addmv:
        with mock.patch("torch.mv", wraps=torch.mv) as mv:
            y = kernels.MV.run(x, kernels.MV.prepare(layer.weight), layer.bias)
    assert (addmv if bias else mv).called
    assert y.dtype == torch.bfloat16 and y.shape == (1, 1, 2304)
    assert ((y.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()


def test_a_prepared_model_keeps_its_preparation(model64):
    """`serve` prepares what `for_decoding` already prepared: a model laid out for compiled steps'
    loop is not measured again and relaid (transposed) for the eager kernels."""
    model = GPT(model64.config).eval()
    decoding.prepare(model, kernels.LOOP)
    with mock.patch.object(decoding, "choose", return_value=kernels.COLUMNS):
        assert decoding.prepare(model) is model
    assert model.lm_head.weight.is_contiguous() and decoding.step_kernel(model, True) is kernels.LOOP


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_compiled_steps_on_a_cpu_keep_the_loops_layout(model64, dtype):
    """`for_decoding(..., compiled=True)` lays fp32 and bf16 out for the loop (rows contiguous), even
    where the eager measurement would store them transposed (`columns`); eager decoding takes that."""
    with mock.patch.object(decoding, "choose", return_value=kernels.COLUMNS):
        fast = decoding.for_decoding(copy.deepcopy(model64), dtype, compiled=True)
        eager = decoding.for_decoding(copy.deepcopy(model64), dtype)
    assert fast.lm_head.weight.is_contiguous() and decoding.step_kernel(fast, True) is kernels.LOOP
    assert kernels.transposed(eager.lm_head.weight) and decoding.step_kernel(eager, False) is kernels.COLUMNS
