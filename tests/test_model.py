import copy
import math

import pytest
import torch
import torch.nn.functional as F

from gpt2repro.config.schema import GPTConfig, model_config
from gpt2repro.model.gpt import GPT


def test_gpt2_124m_parameter_count_is_the_published_one():
    with torch.device("meta"):
        model = GPT(model_config("gpt2"))
    assert model.num_params() == 124_439_808


def test_padded_vocab_adds_only_embedding_rows():
    with torch.device("meta"):
        model = GPT(model_config("gpt2", vocab_multiple=64))
    assert model.config.padded_vocab_size == 50304
    assert model.num_params() == 124_439_808 + (50304 - 50257) * 768


def test_lm_head_shares_storage_with_token_embedding(tiny_config):
    model = GPT(tiny_config)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # counted and optimised once


def test_init_statistics():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=256, vocab_size=4096)
    model = GPT(cfg)
    residual_std = 0.02 / (2 * cfg.n_layer) ** 0.5
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.all(p == 0), name
        elif ".ln_" in name or "ln_f" in name:
            assert torch.all(p == 1), name
        elif name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):
            assert abs(p.std().item() - residual_std) < 0.1 * residual_std, name
        else:
            assert abs(p.std().item() - 0.02) < 0.002, name
            assert abs(p.mean().item()) < 0.002, name


def test_forward_shapes_and_loss(tiny_config):
    model = GPT(tiny_config)
    idx = torch.randint(0, tiny_config.vocab_size, (2, 16))
    logits, loss = model(idx, torch.randint(0, tiny_config.vocab_size, (2, 16)))
    assert logits is None  # training never materialises the logits
    assert loss.item() == pytest.approx(torch.log(torch.tensor(50257.0)).item(), abs=0.3)
    logits, loss = model(idx)
    assert logits.shape == (2, 16, tiny_config.vocab_size) and loss is None  # padded ids are cut off


def test_sequence_longer_than_block_size_is_a_clear_error(tiny_config):
    model = GPT(tiny_config)
    with pytest.raises(ValueError, match="exceeds block_size=128"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_bad_model_config_is_rejected():
    from gpt2repro.config.schema import ConfigError

    with pytest.raises(ConfigError, match="not divisible"):
        GPT(GPTConfig(n_embd=100, n_head=3))
    with pytest.raises(ConfigError, match="unknown model preset"):
        model_config("gpt5")


@pytest.mark.parametrize("chunk", [7, 64, 4096])
def test_fused_linear_cross_entropy_matches_float64_reference(chunk):
    from gpt2repro.model.ops import linear_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(150, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(70, 16, dtype=torch.float64, requires_grad=True)  # 64 real classes + 6 padded rows
    t = torch.randint(0, 64, (150,))
    loss = linear_cross_entropy(h, w, t, 64, chunk=chunk)
    (2.5 * loss).backward()
    got = (loss.detach(), h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w[:64].t(), t)
    (2.5 * ref).backward()
    torch.testing.assert_close(got[0], ref.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1], h.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(got[2], w.grad, rtol=0, atol=1e-12)
    assert torch.all(got[2][64:] == 0)  # padded rows get no gradient


@pytest.mark.parametrize("chunk", [7, 4096])
def test_fused_loss_reuses_cpu_scratch_without_corrupting_saved_gradients(chunk):
    """A second call overwrites the scratch memory; the first call's gradients were copied out."""
    from gpt2repro.model.ops import _CPU_SCRATCH, linear_cross_entropy

    torch.manual_seed(0)
    w = torch.randn(70, 16, dtype=torch.float64, requires_grad=True)
    h1, h2 = (torch.randn(150, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    t1, t2 = torch.randint(0, 64, (150,)), torch.randint(0, 64, (150,))
    loss1 = linear_cross_entropy(h1, w, t1, 64, chunk=chunk)
    buffer = _CPU_SCRATCH[("logits", torch.float64)].data_ptr()
    linear_cross_entropy(h2, w, t2, 64, chunk=chunk)
    assert _CPU_SCRATCH[("logits", torch.float64)].data_ptr() == buffer  # reused, not reallocated
    loss1.backward()
    got = (h1.grad.clone(), w.grad.clone())
    h1.grad = w.grad = None
    F.cross_entropy(h1 @ w[:64].t(), t1).backward()
    torch.testing.assert_close(got[0], h1.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1], w.grad, rtol=0, atol=1e-12)


def test_training_loss_equals_unfused_cross_entropy(tiny_config):
    """Training's fused loss and validation's loss-only path (no_grad: other kernels, another
    summation order) both give the exact loss, a float64 computation, as closely as fp32's own
    reference (F.cross_entropy on fp32 logits) does: within 4x its error, or 4 ulps where it is exact."""
    torch.manual_seed(0)
    model = GPT(tiny_config)
    x, y = torch.randint(0, 50257, (2, 16)), torch.randint(0, 50257, (2, 16))
    _, fused = model(x, y)
    logits, _ = model(x)
    unfused = F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    with torch.no_grad():
        validation = model(x, y)[1].item()
        logits64 = copy.deepcopy(model).double()(x)[0]
    exact = F.cross_entropy(logits64.flatten(0, 1), y.flatten()).item()
    ulp = torch.finfo(torch.float32).eps * 2 ** math.floor(math.log2(exact))  # fp32's spacing at the loss
    tolerance = 4 * max(abs(unfused - exact), ulp)
    assert abs(fused.item() - exact) <= tolerance, (fused.item(), exact, tolerance)
    assert abs(validation - exact) <= tolerance, (validation, exact, tolerance)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16: within bf16-logit rounding of the unfused loss
        _, fused16 = model(x, y)
        logits16, _ = model(x)
        unfused16 = F.cross_entropy(logits16.flatten(0, 1), y.flatten())
    assert abs(fused16.item() - unfused16.item()) < 2e-3


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_gives_the_same_gradients_from_less_memory(every):
    """Recomputing blocks in backward keeps fewer activations, and changes no gradient."""
    cfg = model_config("tiny", n_layer=3)
    torch.manual_seed(0)
    x, y = torch.randint(0, 50257, (2, 32)), torch.randint(0, 50257, (2, 32))
    grads, kept = [], []
    for interval in (0, every):
        torch.manual_seed(1)
        model = GPT(cfg)
        model.recompute_interval = interval
        saved = [0]

        def pack(t, saved=saved):
            saved[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, loss = model(x, y)
        loss.backward()
        kept.append(saved[0])
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert kept[1] < kept[0]
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=0)
