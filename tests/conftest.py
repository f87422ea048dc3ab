"""Shared fixtures. Real data comes from ../shared/data (or $GPT2REPRO_ASSETS); tests that need a file
that is absent skip and say why."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GPT2REPRO_ASSETS") or ROOT.parent / "shared" / "data")
if SHARED.is_dir():
    os.environ["GPT2REPRO_ASSETS"] = str(SHARED)

torch.set_num_threads(min(2, os.cpu_count() or 1))


def shared_file(name: str) -> Path:
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"{path} is absent (set GPT2REPRO_ASSETS to a directory holding {name})")
    return path


def current_umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own asset cache, so nothing leaks into ~/.cache or between tests."""
    monkeypatch.setenv("GPT2REPRO_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def enc():
    shared_file("gpt2.tiktoken")
    from gpt2repro.tokenizer import get_tokenizer

    return get_tokenizer()


@pytest.fixture(scope="session")
def tiny_config():
    from gpt2repro.config import model_config

    return model_config("tiny", vocab_multiple=64)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, enc):
    """Tiny Shakespeare as shards: a 16k-token val shard and 40k-token train shards."""
    from gpt2repro.data.prepare import prepare

    out = tmp_path_factory.mktemp("shards")
    prepare(
        [str(shared_file("tinyshakespeare.txt"))], out, shard_tokens=40_000, val_tokens=16_000, progress=False
    )
    return out


@pytest.fixture(scope="session")
def run_dir(data_dir, tmp_path_factory):
    """A finished 2-step run of a tiny model: a checkpoint to sample, export, evaluate and break."""
    from helpers import small_cfg

    from gpt2repro.train import train

    run = tmp_path_factory.mktemp("run")
    cfg = small_cfg("model.block_size=256", "micro_batch_size=2", "total_batch_size=64", "max_steps=2")
    train(cfg, data_dir, run)
    return run
