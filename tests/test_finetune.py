"""Fine-tuning from pretrained weights (`init_from`): the step-0 loss is transformers' loss of the same
model on the same batches, the architecture comes from the weights, and the result exports."""

import json

import helpers
import pytest
import torch
import torch.nn.functional as F

from conftest import shared_file
from gpt2repro.checkpoint import ckptdir, gathered
from gpt2repro.config.presets import train_config
from gpt2repro.config.schema import ConfigError
from gpt2repro.interop.hf import export_hf
from gpt2repro.parallel.distributed import DistInfo
from gpt2repro.training import train as tr
from gpt2repro.training.plan import resolve

transformers = pytest.importorskip("transformers")
CPU = DistInfo(0, 0, 1, torch.device("cpu"))
# the shared small run without its architecture (init_from brings the weights' own); eager (the
# preset compiles: test_sft's fine-tune of the tiny HF checkpoint runs compiled)
SMALL = [o for o in helpers.SMALL if not o.startswith("model.")] + ["max_lr=1e-3", "compile=false"]


def finetune_cfg(source, *extra):
    return train_config("finetune", [f"init_from={source}", *SMALL, *extra])


def transformers_loss(directory, batches) -> float:
    """Mean next-token loss of the transformers model over the micro-batches, as one step sees them."""
    model = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    with torch.no_grad():
        losses = [F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten()) for x, y in batches]
    return float(sum(losses) / len(losses))


def step_zero_matches_transformers(source, hf_directory, data_dir, run_dir):
    trainer = tr.Trainer(resolve(finetune_cfg(source), CPU), data_dir, run_dir)
    batches = [trainer.train_loader.next_batch() for _ in range(trainer.plan.accum)]
    trainer.train_loader.reset()
    expected = transformers_loss(hf_directory, batches)
    assert trainer.train_step(0).loss == pytest.approx(expected, rel=1e-5)
    return trainer


@pytest.mark.slow
def test_finetune_the_shared_tiny_hf_checkpoint(data_dir, tmp_path):
    tiny = shared_file("tiny-gpt2")
    trainer = step_zero_matches_transformers(tiny, tiny, data_dir, tmp_path / "probe")
    hf_cfg = json.loads((tiny / "config.json").read_text())
    assert (trainer.cfg.model.n_embd, trainer.cfg.model.n_layer) == (hf_cfg["n_embd"], hf_cfg["n_layer"])
    assert trainer.cfg.model.padded_vocab_size == 50304  # the preset's padding, rows never predicted
    cfg = finetune_cfg(tiny, "max_steps=3", "ckpt_every=1")
    given = cfg.to_json()
    summary = tr.train(cfg, data_dir, tmp_path / "run")
    assert summary["step"] == 3 and cfg.to_json() == given  # the caller's config is not changed
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["n_embd"] == 2 and saved["init_from"] == str(tiny)
    # it resumes like any run (from its checkpoint, not from init_from again)
    tr.train(finetune_cfg(tiny, "max_steps=4", "ckpt_every=1"), data_dir, tmp_path / "run")
    assert ckptdir.latest(tmp_path / "run").name == "step_00000004"
    out = export_hf(gathered.load_model(tmp_path / "run"), tmp_path / "hf")
    ours = gathered.load_model(tmp_path / "run").eval()
    idx = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        theirs = transformers.GPT2LMHeadModel.from_pretrained(out).eval()(idx).logits
        torch.testing.assert_close(ours(idx)[0], theirs, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_finetune_a_model_exported_by_us_and_a_run_of_ours(data_dir, run_dir, tmp_path):
    exported = export_hf(gathered.load_model(run_dir), tmp_path / "export")
    step_zero_matches_transformers(exported, exported, data_dir, tmp_path / "from-export")
    step_zero_matches_transformers(run_dir, exported, data_dir, tmp_path / "from-run")


def test_architecture_overrides_conflict_with_init_from(tmp_path):
    with pytest.raises(
        ConfigError, match="model.n_layer cannot be set with init_from=gpt2: the architecture"
    ):
        train_config("finetune", ["model.n_layer=4"])
    assert train_config("finetune", ["model.vocab_multiple=128"]).model.vocab_multiple == 128
    cfg = train_config("finetune")
    assert (cfg.init_from, cfg.hellaswag_every, cfg.max_lr) == ("gpt2", 0, 3e-5)
