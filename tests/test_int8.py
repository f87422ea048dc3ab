"""Int8 weight-only decoding (`--weight-dtype int8`, generation/int8.py): the rounding's error per
output feature, the int8 matmul and whole decoding steps against float64 on the dequantized
weights, the one-line refusals, and sample, chat and serve drawing the same tokens at int8."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch

from gpt2repro.config.schema import model_config
from gpt2repro.generation import cpu_kernels, decoding, int8, kernels
from gpt2repro.generation.chat_session import ChatSession
from gpt2repro.generation.generate import sample_text, sample_tokens
from gpt2repro.generation.sampling import GenerateError, Sampling
from gpt2repro.model.gpt import GPT
from gpt2repro.model.kvcache import KVCache
from gpt2repro.text import chat


def _weights() -> torch.Tensor:
    """Rows of very different sizes (a scale per row matters), one outlier, one row of zeros."""
    torch.manual_seed(0)
    w = torch.randn(48, 96) * torch.logspace(-3, 1, 48)[:, None]
    w[5, 7] = 40.0
    w[9] = 0
    return w


def test_each_row_is_rounded_to_127_steps_of_its_largest_value_within_half_a_step():
    w = _weights()
    q, scale = int8.quantize_rows(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (48,)
    top = w.abs().amax(1)
    torch.testing.assert_close(scale[top > 0], top[top > 0] / 127, rtol=1e-7, atol=0)
    assert (q.abs().amax(1)[top > 0] == 127).all() and (q[9] == 0).all()
    error = (w.double() - int8.dequantize(q, scale).double()).abs()
    assert (error.amax(1) <= scale.double() * (0.5 + 1e-6)).all()  # per row: half its own step
    assert error.amax(1)[0] < 1e-3 * error.amax(1)[-1]  # not one scale for all rows


def _vnni() -> None:
    if not cpu_kernels.vnni():
        pytest.skip("this CPU has no AVX-512 VNNI: int8 decodes through the loop (tested above)")


@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("bias", [True, False])
def test_the_int8_loop_is_x_times_the_dequantized_weights_in_float64(rows, bias, monkeypatch):
    """Read as int8 in one compiled loop (a few rows) or dequantized (many): fp32 sums of exact
    products, so within fp32 rounding of the float64 result."""
    monkeypatch.setattr(cpu_kernels, "_FOUND", [False])  # the kernel of CPUs without VNNI
    w = _weights()
    prepared = int8.quantize_rows(w)
    b = torch.randn(48) if bias else None
    x = torch.randn(rows, 1, 96)
    exact = x.double() @ int8.dequantize(*prepared).double().T + (0 if b is None else b.double())
    got = int8.int8_linear(x, prepared, b)
    assert got.shape == (rows, 1, 48) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exact, rtol=0, atol=1e-5 * exact.abs().max().item())


def test_activations_are_rounded_per_block_of_32_within_half_a_step():
    x = torch.randn(3, 70) * torch.logspace(-4, 2, 70)  # blocks of very different sizes, a short last one
    x[1, 32:64] = 0
    values, steps = cpu_kernels.round_activations(x)
    assert values.shape == steps.shape == x.shape and (values.abs() <= 127).all()
    assert torch.equal(values, values.round())
    for start in (0, 32, 64):
        block = x[:, start : start + 32]
        torch.testing.assert_close(steps[:, start], block.abs().amax(1) / 127, rtol=1e-7, atol=0)
    assert (values[1, 32:64] == 0).all() and (steps[1, 32:64] == 0).all()
    assert ((values * steps).double() - x.double()).abs().le(steps.double() * (0.5 + 1e-6)).all()


@pytest.mark.parametrize("in_features", [96, 768, 70, 3072])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("inputs", ["centred", "gelu"])
def test_the_vnni_kernel_is_the_rounded_activations_times_the_dequantized_weights(in_features, rows, inputs):
    """On a VNNI CPU: each row of x rounded as `round_activations` (int8 per block of 32), exact int32
    sums within a block, fp32 across: within fp32 rounding of the float64 product of the two
    roundings, and within the activations' half step (times |w|) of the exact product. GELU's
    outputs (mostly positive, as the MLP's second matmul reads) too: no large sum cancels there."""
    _vnni()
    torch.manual_seed(1)
    w = torch.randn(48, in_features) * torch.logspace(-3, 1, 48)[:, None]
    q, scale = int8.quantize_rows(w)
    b, x = torch.randn(48), torch.randn(rows, 1, in_features) * 3
    x = torch.nn.functional.gelu(x) if inputs == "gelu" else x
    got = int8.int8_linear(x, (q, scale), b).double()
    values, steps = cpu_kernels.round_activations(x)
    dequantized = int8.dequantize(q, scale).double()
    rounded = (values.double() * steps.double()) @ dequantized.T + b.double()
    torch.testing.assert_close(got, rounded, rtol=0, atol=1e-6 * rounded.abs().max().item())
    exact = x.double() @ dequantized.T + b.double()
    bound = (steps.double() / 2) @ dequantized.abs().T  # each activation within half its step
    assert ((got - exact).abs() <= bound * 1.0001 + 1e-6 * exact.abs().max()).all()
    assert (got - exact).abs().max() > 1e-4 * exact.abs().max()  # (the activations were rounded)


def test_the_vnni_kernel_refuses_a_scale_per_row_that_does_not_match_in_one_line():
    _vnni()
    q, scale = int8.quantize_rows(torch.randn(16, 64))
    with pytest.raises(RuntimeError, match="int8_linear: one scale and bias per row"):
        torch.ops.gpt2repro.int8_linear(torch.randn(1, 64), q, scale[:15], None)
    with pytest.raises(RuntimeError, match="int8_linear: one scale and bias per row"):
        torch.ops.gpt2repro.int8_linear(torch.randn(1, 64), q, scale, torch.zeros(17))


def test_the_vnni_kernel_gives_nan_for_non_finite_rows_and_zeros_for_tiny_blocks():
    _vnni()
    q, scale = int8.quantize_rows(torch.randn(16, 64))
    x = torch.randn(4, 64)
    x[1, 3], x[2, 40] = float("nan"), float("inf")
    x[3, :32] = 1e-39  # 127 / top is not finite: the block counts as zeros
    got = int8.int8_linear(x, (q, scale), None)
    assert got[1:3].isnan().all() and got[[0, 3]].isfinite().all()
    only_second = x[3:4].clone()
    only_second[0, :32] = 0
    torch.testing.assert_close(got[3:4], int8.int8_linear(only_second, (q, scale), None), rtol=0, atol=0)
    values, steps = cpu_kernels.round_activations(x)
    assert steps[1, :32].isnan().all() and not steps[1, 32:].isnan().any() and (values[3, :32] == 0).all()


def _step_logits(model, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy steps through the model's Decoder after its forward read the prompt: tokens, logits."""
    cache = KVCache.empty(model.config, 1, "cpu", torch.float32)
    decoder = decoding.Decoder(model)
    with torch.no_grad():
        logits = model.logits(model.hidden(torch.tensor([prompt]), cache)[:, -1])
    seq, seen = list(prompt), []
    for _ in range(steps):
        seq.append(int(logits.argmax()))
        logits = decoder(torch.tensor([[seq[-1]]]), cache)
        seen.append(logits[0])
    assert decoder.kernel is kernels.INT8
    return seq, torch.stack(seen)


@pytest.mark.parametrize("kernel", ["loop", "vnni"])
def test_int8_decoding_steps_are_the_forward_on_the_dequantized_weights_in_float64(kernel, monkeypatch):
    """`for_decoding(model, "int8")` leaves the int8 values in the model's own fp32 weights (tied
    ones tied); its steps, reading int8, give the float64 forward's logits on those values (the VNNI
    kernel's: with each step's Linear inputs rounded as it rounds them)."""
    if kernel == "loop":
        monkeypatch.setattr(cpu_kernels, "_FOUND", [False])
    else:
        _vnni()
    torch.manual_seed(0)
    model = GPT(model_config("tiny", n_layer=2, vocab_multiple=64)).eval()
    before = model.lm_head.weight.detach().clone()
    decoding.for_decoding(model, "int8")
    assert model.lm_head.weight is model.transformer.wte.weight
    assert 0 < (model.lm_head.weight - before).abs().max() <= before.abs().max() / 254 * 1.001
    prompt = [3, 14, 159, 26, 535]
    seq, seen = _step_logits(model, prompt, steps=8)
    reference = copy.deepcopy(model).double()
    if kernel == "vnni":
        cpu_kernels.rounding_linear_inputs(reference, len(prompt))
    with torch.no_grad():
        exact = reference(torch.tensor([seq]))[0][0, -8:]
    spread = exact.std().item()
    # The VNNI reference rounds float64 activations, the steps fp32 ones: a value within their
    # difference of a rounding boundary may land one step apart (~1e-3 of the spread); missing the
    # rounding altogether is ~4e-2 (measured), the loop's fp32 sums ~1e-6.
    assert (seen.double() - exact).abs().max().item() < (1e-4 if kernel == "loop" else 5e-3) * spread
    assert torch.equal(seen.argmax(-1), exact.argmax(-1))


def test_int8_is_refused_in_one_line_where_it_cannot_run(monkeypatch):
    model = GPT(model_config("tiny", n_layer=1)).eval()
    with pytest.raises(GenerateError, match="^--weight-dtype int8 needs fp32 weights on the CPU"):
        decoding.for_decoding(copy.deepcopy(model).bfloat16(), "int8")
    sharded = type("DTensor", (torch.nn.Parameter,), {})(torch.zeros(1))
    with mock.patch.object(GPT, "parameters", lambda self: iter([sharded])):
        with pytest.raises(GenerateError, match="^--weight-dtype int8 needs a whole model, not FSDP"):
            decoding.for_decoding(model, "int8")
    q = int8.quantize_rows(torch.randn(5, 7))  # shapes no other test compiled
    monkeypatch.setattr(cpu_kernels, "_FOUND", [False])  # the loop (CPUs without VNNI) needs the compiler
    torch._dynamo.reset()
    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",)}):
        with pytest.raises(GenerateError, match="^--weight-dtype int8 needs torch.compile's C\\+\\+"):
            int8.int8_linear(torch.randn(1, 7), q, None)
    torch._dynamo.reset()


SETTINGS = dict(temperature=1.3, top_k=7, top_p=0.9, presence_penalty=0.6, frequency_penalty=0.4)


def test_sample_chat_and_serve_draw_the_same_tokens_at_int8(chat_run_dir, capsys, monkeypatch):
    """The same seed and settings: the same reply from `chat`'s session, `sample`'s sampler and the
    server, all three decoding the int8 model; and `sample`/`chat --weight-dtype int8` run that model."""
    pytest.importorskip("starlette", reason="the serve extra (starlette, uvicorn) is not installed")
    from helpers import run_main
    from test_decoding import _post

    from gpt2repro.checkpoint.gathered import load_model
    from gpt2repro.serve.app import create_app
    from gpt2repro.serve.run import ServerThread, served_model

    fp32 = load_model(chat_run_dir).eval()
    model = decoding.for_decoding(copy.deepcopy(fp32), "int8")
    prompt = chat.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    reply = list(ChatSession(model, max_new_tokens=12, seed=7, **SETTINGS).send("Hi"))
    assert sample_tokens(model, prompt, 1, 12, sampling=Sampling(**SETTINGS, seed=7)) == [reply]
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12, "seed": 7}
    served = served_model(model, "m", 2)
    try:
        with ServerThread(create_app(served)) as s:
            r = _post(s.url + "/v1/chat/completions", {**body, **SETTINGS})[1]
    finally:
        served.engine.stop()
    assert r["choices"][0]["message"]["content"] == chat.decode(reply)
    made = []  # the kernel of every decoder the commands below make: int8's
    init = decoding.Decoder.__init__
    monkeypatch.setattr(
        decoding.Decoder, "__init__", lambda d, *a, **k: (init(d, *a, **k), made.append(d.kernel))[0]
    )
    code, out, err = run_main(
        capsys, "sample", "--checkpoint", chat_run_dir, "--weight-dtype", "int8", "--prompt", "Hi",
        "-n", "2", "--max-new-tokens", "12", "--seed", "3",
    )  # fmt: skip
    assert code == 0, err
    texts = sample_text(model, "Hi", 2, 12, sampling=Sampling(seed=3))
    assert out == "".join(f"> {t}\n" for t in texts)
    settings = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    code, out, err = run_main(
        capsys, "chat", "--checkpoint", chat_run_dir, "--weight-dtype", "int8", "--message", "Hi",
        "--seed", "7", "--max-new-tokens", "12", *settings,
    )  # fmt: skip
    assert code == 0 and out.strip() == chat.decode(reply).strip(), (out, err)
    assert len(made) >= 2 and all(k is kernels.INT8 for k in made)


def test_an_int8_models_weights_are_rounded_once_not_per_prompt():
    """Rounding 124M weights takes longer than reading a prompt: every decoder (a prompt, a chat
    turn) reads the same int8 tensors."""
    model = decoding.for_decoding(GPT(model_config("tiny", n_layer=1)).eval(), "int8")
    first, second = decoding.Decoder(model), decoding.Decoder(model)
    int8 = [m for m in first.tensors[3] if m.dtype == torch.int8]
    assert len(int8) == 5 and all(a is b for a, b in zip(first.tensors[3], second.tensors[3]))


def test_compiled_steps_draw_the_eager_tokens_in_sample_chat_and_serve(chat_run_dir, capsys, monkeypatch):
    """`--compile`, the fast path at int8: the same greedy reply from the eager steps and the compiled
    ones in chat's session, `sample`, `chat --compile` and the server (compiled before it listens)."""
    pytest.importorskip("starlette", reason="the serve extra (starlette, uvicorn) is not installed")
    from helpers import run_main
    from test_decoding import _post

    from gpt2repro.checkpoint.gathered import load_model
    from gpt2repro.serve.app import create_app
    from gpt2repro.serve.run import ServerThread, served_model

    model = decoding.for_decoding(load_model(chat_run_dir).eval(), "int8", compiled=True)
    greedy = dict(max_new_tokens=12, temperature=0)
    reply = list(ChatSession(model, **greedy).send("Hi"))
    assert list(ChatSession(model, compiled=True, **greedy).send("Hi")) == reply
    prompt = chat.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert sample_tokens(model, prompt, 1, 12, sampling=Sampling(0), compiled=True) == [reply]
    served = served_model(
        model, "m", 1, compiled=True
    )  # (one graph in this test: batches, test_serve_engine)
    try:
        with ServerThread(create_app(served)) as s:
            body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12}
            r = _post(s.url + "/v1/chat/completions", {**body, "temperature": 0})[1]
    finally:
        served.engine.stop()
    assert r["choices"][0]["message"]["content"] == chat.decode(reply)
    compiled = []  # whether each decoder `chat --compile` makes is compiled
    init = decoding.Decoder.__init__
    monkeypatch.setattr(
        decoding.Decoder, "__init__", lambda d, *a, **k: (init(d, *a, **k), compiled.append(d.compiled))[0]
    )
    code, out, err = run_main(
        capsys, "chat", "--checkpoint", chat_run_dir, "--weight-dtype", "int8", "--compile", "--message", "Hi",
        "--max-new-tokens", "12", "--temperature", "0",
    )  # fmt: skip
    assert code == 0 and out.strip() == chat.decode(reply).strip(), (out, err)
    assert compiled and all(c is not None for c in compiled) and "compiling the decoding step" in err
