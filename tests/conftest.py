"""Shared fixtures. Real data comes from ../shared/data (or $GPT2REPRO_ASSETS); tests that need a file
that is absent skip and say why."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GPT2REPRO_ASSETS") or ROOT.parent / "shared" / "data")
if SHARED.is_dir():
    os.environ["GPT2REPRO_ASSETS"] = str(SHARED)

# make test runs two pytest workers on the 2 cores (pytest-xdist), one thread each; the `serial` pass
# runs alone with both
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
torch.set_num_threads(1 if WORKER else min(2, os.cpu_count() or 1))
if WORKER:  # and the processes a worker starts: a second thread would only contend with the other worker
    os.environ["OMP_NUM_THREADS"] = "1"


def shared_file(name: str) -> Path:
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"{path} is absent (set GPT2REPRO_ASSETS to a directory holding {name})")
    return path


def current_umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


@pytest.fixture(scope="session")
def _host_peaks(tmp_path_factory) -> Path:
    """This host's GEMM peaks (fp32, bf16, at one torch thread as make test's workers and every rank
    run), measured once a session in a cache of their own. Every training process measures the peak
    its MFU is against: 7 GEMM runs with an empty cache, a 2-run look with the host's best cached
    (~0.45 s a process, dozens of CLI runs and torchrun ranks a session)."""
    from gpt2repro.training import mfu

    cache = tmp_path_factory.mktemp("peaks")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GPT2REPRO_CACHE", str(cache))
        torch.set_num_threads(1)
        try:
            for dtype in ("fp32", "bf16"):
                mfu.device_peak_flops(torch.device("cpu"), dtype)
        finally:
            torch.set_num_threads(threads)
            mfu.device_peak_flops.cache_clear()  # each test measures as if no one had
    return cache / mfu.PEAK_CACHE


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path_factory, monkeypatch):
    """Each test gets its own asset cache, so nothing leaks into ~/.cache or between tests. A test
    that trains (on `data_dir` or `chat_data_dir`) finds the host's GEMM peaks in it (`_host_peaks`),
    unless marked `measures_peak` (it needs the empty cache of a new host)."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("GPT2REPRO_CACHE", str(cache))
    trains = {"data_dir", "chat_data_dir"} & set(request.fixturenames)
    if trains and not request.node.get_closest_marker("measures_peak"):
        peaks = request.getfixturevalue("_host_peaks")
        if peaks.exists():
            shutil.copy(peaks, cache / peaks.name)


@pytest.fixture(scope="session")
def enc():
    shared_file("gpt2.tiktoken")
    from gpt2repro.text.tokenizer import get_tokenizer

    return get_tokenizer()


@pytest.fixture(scope="session")
def tiny_config():
    from gpt2repro.config.schema import model_config

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

    from gpt2repro.training.train import train

    run = tmp_path_factory.mktemp("run")
    cfg = small_cfg("model.block_size=256", "micro_batch_size=2", "total_batch_size=64", "max_steps=2")
    train(cfg, data_dir, run)
    return run


def shakespeare_dialogues(limit: int) -> list[dict]:
    """Conversations from Tiny Shakespeare: one speech as the user's turn, the reply to it as the
    assistant's (real text, turns of uneven length)."""
    blocks = shared_file("tinyshakespeare.txt").read_text().split("\n\n")
    speeches = [b.split("\n", 1)[1] for b in blocks if "\n" in b.strip()]  # "SPEAKER:\nlines"
    pairs = zip(speeches[0::2], speeches[1::2])
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in list(pairs)[:limit]
    ]


def write_conversations(path: Path, records: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def chat_data_dir(tmp_path_factory, enc):
    """Tiny Shakespeare dialogues as conversation rows of 64 tokens: 8 held-out rows, then train."""
    from gpt2repro.data.conversations import prepare_conversations

    root = tmp_path_factory.mktemp("chat-data")
    src = write_conversations(root / "dialogues.jsonl", shakespeare_dialogues(400))
    prepare_conversations([str(src)], root / "data", seq_len=64, val_tokens=8 * 64, progress=False)
    return root / "data"


GREETING = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
CHAT_SMALL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=128"]
CHAT_SMALL += ["micro_batch_size=4", "seq_len=64", "total_batch_size=256", "dtype=fp32", "log_every=0"]
CHAT_SMALL += ["hellaswag_every=0", "sample_every=0", "val_every=0", "warmup_steps=2"]


@pytest.fixture(scope="session")
def chat_run_dir(tmp_path_factory, enc):
    """A tiny chat model fine-tuned until it answers "Hi" with "Hello there." and ends its turn."""
    from gpt2repro.config.presets import train_config
    from gpt2repro.data.conversations import prepare_conversations
    from gpt2repro.training import sft

    root = tmp_path_factory.mktemp("chat-run")
    src = write_conversations(root / "greeting.jsonl", [{"messages": GREETING}] * 64)
    prepare_conversations([str(src)], root / "data", seq_len=64, val_tokens=64, progress=False)
    cfg = train_config("cpu-tiny", ["model.chat=true", *CHAT_SMALL, "max_steps=20", "max_lr=1e-2"])
    sft.train(cfg, root / "data", root / "run")
    return root / "run"
