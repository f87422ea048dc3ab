import pytest
import torch

from gpt2repro.config import GPTConfig, model_config
from gpt2repro.model import GPT


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
    assert logits.shape == (2, 16, tiny_config.vocab_size)  # padded ids are cut off
    assert loss.item() == pytest.approx(torch.log(torch.tensor(50257.0)).item(), abs=0.3)
    logits, loss = model(idx)
    assert loss is None


def test_sequence_longer_than_block_size_is_a_clear_error(tiny_config):
    model = GPT(tiny_config)
    with pytest.raises(ValueError, match="exceeds block_size=128"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_bad_model_config_is_rejected():
    from gpt2repro.config import ConfigError

    with pytest.raises(ConfigError, match="not divisible"):
        GPT(GPTConfig(n_embd=100, n_head=3))
    with pytest.raises(ConfigError, match="unknown model preset"):
        model_config("gpt5")
