"""Parity with transformers.GPT2LMHeadModel, both directions, and the exported directory's tokenizer."""

import json

import pytest
import torch

from conftest import shared_file
from gpt2repro.config.schema import model_config
from gpt2repro.interop.hf import HFError, export_hf, load_hf
from gpt2repro.model.gpt import GPT

transformers = pytest.importorskip("transformers")


def _hf_logits(directory, idx):
    model = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(idx).logits


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=3, n_head=4, n_embd=64, n_positions=128, vocab_size=50257)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    d = tmp_path_factory.mktemp("hf")
    model.save_pretrained(d)
    return d


def test_load_hf_saved_model_matches_transformers(hf_dir):
    idx = torch.randint(0, 50257, (2, 40))
    ours = load_hf(hf_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], _hf_logits(hf_dir, idx), rtol=0, atol=1e-5)


def test_export_loads_in_transformers_with_equal_logits(tmp_path, enc):
    torch.manual_seed(1)
    model = GPT(model_config("tiny", vocab_multiple=64)).eval()
    out = export_hf(model, tmp_path / "export")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["vocab_size"] == 50257
    idx = torch.randint(0, 50257, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(_hf_logits(out, idx), model(idx)[0], rtol=0, atol=1e-5)
    # and back again: the round trip is exact
    back = load_hf(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(idx)[0], model(idx)[0], rtol=0, atol=0)


def test_shared_tiny_gpt2_checkpoint_parity(tmp_path, enc):
    d = shared_file("tiny-gpt2")
    idx = torch.randint(0, 50257, (3, 25))
    ours = load_hf(d).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], _hf_logits(d, idx), rtol=0, atol=1e-5)
    out = export_hf(ours, tmp_path / "re-export")
    with torch.no_grad():
        torch.testing.assert_close(_hf_logits(out, idx), _hf_logits(d, idx), rtol=0, atol=1e-5)


TEXTS = [
    "Hello, I'm a language model,",
    "  leading spaces and\ttabs\n\n\nnewlines   ",
    "numbers 1234567 3.14159 and 10,000,000",
    "unicode: café naïve Ωμέγα 日本語 😀🚀 \u200b",
    "it's they'll we've I'd DON'T",
    "code: def f(x):\n    return x**2  # comment",
]


def test_exported_tokenizer_matches_tiktoken(tmp_path, enc):
    out = export_hf(GPT(model_config("tiny")), tmp_path / "tok")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert tok.encode(text) == enc.encode_ordinary(text), text
    assert tok.eos_token_id == 50256
    assert tok.decode(enc.encode(TEXTS[3])) == TEXTS[3]


def test_pipeline_generates_offline(tmp_path, enc):
    out = export_hf(GPT(model_config("tiny")), tmp_path / "pipe")
    pipe = transformers.pipeline("text-generation", model=str(out))
    result = pipe("Hello, I'm a language model,", max_new_tokens=5, do_sample=False)
    assert result[0]["generated_text"].startswith("Hello, I'm a language model,")


def test_load_errors_name_the_problem(tmp_path, hf_dir):
    with pytest.raises(HFError, match="not a directory and not a hub name"):
        load_hf(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HFError, match="no config.json"):
        load_hf(empty)
    # wrong shapes: a config that does not match the weights
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["n_embd"] = 32
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        HFError, match=r"shape mismatch: transformer.wte.weight \(50304, 64\) vs \(50304, 32\)"
    ):
        load_hf(bad)
    # corrupted weights
    (bad / "config.json").write_text((hf_dir / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(HFError, match="corrupted or unreadable"):
        load_hf(bad)


def test_hub_name_offline_says_how_to_use_a_local_directory(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE set after huggingface_hub was imported (as a user's shell may export it for one
    command) still means no network call: only the (here empty) local cache is looked at."""
    pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    calls = []
    real = huggingface_hub.hf_hub_download

    def recorded(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recorded)
    with pytest.raises(HFError, match="pass its local directory"):
        load_hf("gpt2")
    assert [c.get("local_files_only") for c in calls] == [True]


def test_export_refuses_non_empty_directory(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(HFError, match="not empty"):
        export_hf(GPT(model_config("tiny")), tmp_path / "x")
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_pytorch_model_bin_loads_with_weights_only(hf_dir, tmp_path):
    """The layout of older HF checkpoints: a pickled state dict, read without running pickled code."""
    model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir)
    (tmp_path / "bin").mkdir()
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((hf_dir / "config.json").read_text())
    idx = torch.randint(0, 50257, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(
            load_hf(tmp_path / "bin").eval()(idx)[0], _hf_logits(hf_dir, idx), rtol=0, atol=1e-5
        )
