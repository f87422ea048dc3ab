"""Every remaining handled bad input reaches its one-line message."""

import json

import numpy as np
import pytest
import torch

from conftest import shared_file
from gpt2repro.checkpoint import ckptdir, gathered
from gpt2repro.config.presets import train_config
from gpt2repro.config.schema import ConfigError, GPTConfig
from gpt2repro.data import prepare as prep
from gpt2repro.data.loader import DataLoader
from gpt2repro.data.shards import ShardError, read_shard, write_shard
from gpt2repro.interop.hf import HFError, load_hf
from gpt2repro.parallel.distributed import pick_device


@pytest.fixture
def hf_copy(tmp_path):
    src = shared_file("tiny-gpt2")
    d = tmp_path / "hf"
    d.mkdir()
    (d / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    return d, json.loads((src / "config.json").read_text())


def test_hf_config_errors(hf_copy):
    d, cfg = hf_copy
    (d / "config.json").write_text("{not json")
    with pytest.raises(HFError, match="config.json: not valid JSON"):
        load_hf(d)
    (d / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "n_embd"}))
    with pytest.raises(HFError, match="lacks the GPT-2 field 'n_embd'"):
        load_hf(d)
    (d / "config.json").write_text(json.dumps({**cfg, "activation_function": "relu"}))
    with pytest.raises(HFError, match="unsupported activation_function 'relu'"):
        load_hf(d)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").unlink()
    with pytest.raises(HFError, match="no model.safetensors or pytorch_model.bin"):
        load_hf(d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02garbage")
    with pytest.raises(HFError, match="pytorch_model.bin: corrupted or unreadable weights"):
        load_hf(d)


def test_missing_keys_are_listed(hf_copy):
    from safetensors.torch import load_file, save_file

    d, cfg = hf_copy
    (d / "config.json").write_text(json.dumps(cfg))
    state = load_file(d / "model.safetensors")
    state.pop("transformer.h.1.mlp.c_fc.bias")
    state["transformer.extra.weight"] = torch.zeros(1)
    save_file(state, d / "model.safetensors")
    with pytest.raises(
        HFError, match=r"missing: transformer.h.1.mlp.c_fc.bias; unexpected: transformer.extra.weight"
    ):
        load_hf(d)


def test_checkpoint_errors(run_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    good = (broken / "checkpoints" / "latest").read_text()
    (broken / "checkpoints" / "latest").write_text("step_00000099\n")
    loaded = gathered.load_model(broken).transformer.wte.weight  # the newest that verifies...
    assert torch.equal(
        loaded, gathered.load_model(broken / "checkpoints" / good.strip()).transformer.wte.weight
    )
    assert (
        f"step_00000099: no such checkpoint directory; using {good.strip()} instead"
        in capsys.readouterr().err
    )
    (broken / "checkpoints" / "latest").write_text(good)
    ckpt = ckptdir.latest(broken)
    (ckpt / "optimizer.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(
        ckptdir.CheckpointError, match="no checkpoint of .* verifies .*optimizer.pt: sha256 mismatch"
    ):
        gathered.load_model(broken)  # ...and says so when none does
    state_file = ckpt / "state.json"  # a checkpoint of an older version, without sha256s
    state_file.write_text(
        json.dumps(
            {k: v for k, v in json.loads(state_file.read_text()).items() if k not in ("sha256", "manifest")}
        )
    )
    (ckpt / "manifest.json").unlink()
    capsys.readouterr()
    model = gathered.load_model(broken)
    assert "predates checkpoint manifests" in capsys.readouterr().err  # loads, with a notice
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ckptdir.CheckpointError, match="incomplete or corrupted checkpoint"):
        gathered.load_training(ckpt, model, opt)
    (ckpt / "config.json").write_text("{}")
    with pytest.raises(ckptdir.CheckpointError, match="config.json: unreadable config"):
        gathered.load_model(broken)


def test_prepare_argument_and_column_errors(tmp_path, enc):
    src = tmp_path / "a.txt"
    src.write_text("hello")
    with pytest.raises(prep.PrepareError, match="shard_tokens must be at least 1, got 0"):
        prep.prepare([str(src)], tmp_path / "o", shard_tokens=0, progress=False)
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(prep.PrepareError, match="no column 'text' \\(columns: content\\)"):
        prep.prepare([str(tmp_path / "d.parquet")], tmp_path / "o2", progress=False)


def test_loader_rank_and_npy_errors(tmp_path):
    write_shard(tmp_path / "train_000000.bin", np.arange(40))
    with pytest.raises(ValueError, match="rank 2 is not within world_size 2"):
        DataLoader(tmp_path, "train", 1, 8, rank=2, world_size=2)
    with pytest.raises(ShardError, match="has 4 batches of B\\*T tokens, fewer than the 8 one step takes"):
        DataLoader(tmp_path, "train", 1, 8, rank=0, world_size=8)
    np.save(tmp_path / "x.npy", np.zeros((2, 3), dtype=np.uint16))
    with pytest.raises(ShardError, match="expected a 1-D integer array"):
        read_shard(tmp_path / "x.npy")


def test_config_and_device_errors():
    with pytest.raises(ConfigError, match="model.n_layer=0: expected a positive integer"):
        GPTConfig(n_layer=0).validate()
    with pytest.raises(ConfigError, match="micro_batch_size=0: expected a positive integer"):
        train_config("cpu-tiny", ["micro_batch_size=0"])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device=cuda requested but CUDA is not available"):
            pick_device("cuda")
    assert pick_device("cpu").type == "cpu"


def test_hellaswag_ending_longer_than_block_size(enc):
    from gpt2repro.config.schema import model_config
    from gpt2repro.evals import hellaswag as hs
    from gpt2repro.model.gpt import GPT

    model = GPT(model_config("tiny", block_size=8))
    ex = {
        "ctx": "a b",
        "ctx_a": "a",
        "ctx_b": "b",
        "activity_label": "x",
        "label": 0,
        "endings": ["word " * 20, "b", "c", "d"],
    }
    with pytest.raises(hs.HellaSwagError, match="ending 0 alone does not fit block_size=8"):
        hs.evaluate(model, [ex], "completion")
