"""`prepare --source hf-shards:…`: llm.c shards tokenized already, fetched from a directory laid out
like kjj0/finewebedu10B-gpt2 (the hub path, through a local hub that fails on purpose: test_hub.py)."""

import json

import numpy as np
import pytest
from helpers import assert_one_line_error, losses, small_cfg

from gpt2repro.cli import main
from gpt2repro.data import hubshards
from gpt2repro.data import prepare as prep
from gpt2repro.data.shards import MAGIC, find_shards, read_shard, verify_shards
from gpt2repro.files.fsio import sha256_file
from gpt2repro.text.tokenizer import EOT_ID
from gpt2repro.training.train import train

TOKENS = {"val": 3000, "train": 5000}  # per shard


def llmc_shard(path, tokens, magic=MAGIC, version=1, count=None):
    """A shard as llm.c's fineweb.py writes it: 256 int32 (magic, version, count), uint16 tokens."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = (magic, version, len(tokens) if count is None else count)
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())
    return path


def documents(n: int, seed: int) -> np.ndarray:
    """`n` tokens of documents, each <|endoftext|> and then ids below it."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, EOT_ID, n)
    tokens[rng.choice(n, n // 100, replace=False)] = EOT_ID
    tokens[0] = EOT_ID
    return tokens


@pytest.fixture
def repo(tmp_path):
    """finewebedu_val_000000.bin and finewebedu_train_000001..3.bin, plus a file that is no shard."""
    d = tmp_path / "finewebedu10B-gpt2"
    d.mkdir()
    llmc_shard(d / "finewebedu_val_000000.bin", documents(TOKENS["val"], 0))
    for i in (1, 2, 3):
        llmc_shard(d / f"finewebedu_train_{i:06d}.bin", documents(TOKENS["train"], i))
    (d / "README.md").write_text("GPT-2 tokens of FineWeb-EDU 10B")
    return d


def fetch(repo, out, **kw):
    return prep.prepare([f"hf-shards:{repo}"], out, progress=False, **kw)


def files(d):
    return sorted(p.name for p in d.iterdir())


def test_names_map_to_ours_and_verify_and_training_accept_them(repo, tmp_path, capsys):
    out = tmp_path / "data"
    m = fetch(repo, out, max_shards=2, val_tokens=1000)
    assert files(out) == ["manifest.json", "train_000001.bin", "train_000002.bin", "val_000000.bin"]
    assert [p.name for p in find_shards(out, "train")] == ["train_000001.bin", "train_000002.bin"]
    for i in (1, 2):  # whole shards: the very bytes, linked rather than stored twice
        ours, theirs = out / f"train_00000{i}.bin", repo / f"finewebedu_train_00000{i}.bin"
        assert ours.read_bytes() == theirs.read_bytes() and ours.stat().st_ino == theirs.stat().st_ino
    val = read_shard(out / "val_000000.bin")  # a truncated copy with its own, correct header
    np.testing.assert_array_equal(val, read_shard(repo / "finewebedu_val_000000.bin")[:1000])
    assert [(s["file"], s["split"], s["tokens"]) for s in m["shards"]] == [
        ("val_000000.bin", "val", 1000),
        ("train_000001.bin", "train", 5000),
        ("train_000002.bin", "train", 5000),
    ]
    assert all(s["sha256"] == sha256_file(out / s["file"]) for s in m["shards"])
    kept = [read_shard(out / s["file"]) for s in m["shards"]]
    assert m["complete"] and m["total_tokens"] == 11000
    assert m["documents"] == sum(int((t == EOT_ID).sum()) for t in kept) > 100
    assert json.loads((out / "manifest.json").read_text()) == m
    assert verify_shards(out) == (3, [])
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0 and "3 shards verified" in capsys.readouterr().out
    cfg = small_cfg("max_steps=3", "verify_data=true", "val_every=3", "val_steps=2")
    summary = train(cfg, out, tmp_path / "run")
    assert "verified 3 shards" in capsys.readouterr().out
    assert len(losses(tmp_path / "run")) == 3 and np.isfinite(summary["val_loss"])


def test_all_shards_by_default_and_without_val(repo, tmp_path):
    m = fetch(repo, tmp_path / "all")
    assert [s["file"] for s in m["shards"]] == ["val_000000.bin", *[f"train_00000{i}.bin" for i in (1, 2, 3)]]
    assert m["shards"][0]["tokens"] == TOKENS["val"]  # the whole val shard, linked like the others
    assert m["shards"][0]["sha256"] == sha256_file(repo / "finewebedu_val_000000.bin")
    m = fetch(repo, tmp_path / "none", val_tokens=0, max_shards=1)
    assert [s["file"] for s in m["shards"]] == ["train_000001.bin"]
    m = fetch(repo, tmp_path / "more", val_tokens=10**9)  # more than there is: the whole shard
    assert m["shards"][0]["tokens"] == TOKENS["val"]


def test_a_rerun_fetches_only_what_the_manifest_lacks(repo, tmp_path, monkeypatch, capsys):
    full = fetch(repo, tmp_path / "full", max_shards=3, val_tokens=1000)
    real, calls = hubshards._download, []

    def dying_download(out, remote, item, resume):
        calls.append(item.source)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while fetching the second train shard
        return real(out, remote, item, resume)

    monkeypatch.setattr(hubshards, "_download", dying_download)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        fetch(repo, out, max_shards=3, val_tokens=1000)
    partial = json.loads((out / "manifest.json").read_text())
    assert [s["file"] for s in partial["shards"]] == ["val_000000.bin", "train_000001.bin"]
    assert not partial["complete"]
    (out / "train_000002.bin").write_bytes(b"published just before a kill -9, not listed yet")
    (out / ".train_000003.bin.a1b2c3.tmp").write_bytes(b"a killed copy's temporary")
    calls.clear()
    resumed = fetch(repo, out, max_shards=3, val_tokens=1000)
    assert calls == ["finewebedu_train_000002.bin", "finewebedu_train_000003.bin"]
    assert resumed["shards"] == full["shards"] and resumed["documents"] == full["documents"]
    assert files(out) == files(tmp_path / "full")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    fetch(repo, out, max_shards=3, val_tokens=1000)
    assert "already complete" in capsys.readouterr().out and calls[2:] == []
    assert before == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(prep.PrepareError, match="different arguments"):
        fetch(repo, out, max_shards=2, val_tokens=1000)


def truncated(path):
    path.write_bytes(path.read_bytes()[:-10])


def shorter_than_its_header(path):
    path.write_bytes(b"short")


def wrong_magic(path):
    llmc_shard(path, read_shard(path), magic=20240801)


def wrong_version(path):
    llmc_shard(path, read_shard(path), version=7)


def not_gpt2(path):
    tokens = np.array(read_shard(path))
    tokens[17] = 50257
    llmc_shard(path, tokens)


BAD = [
    (truncated, "train_000002", "header says 5000 tokens (11024 bytes) but the file has 11014 bytes"),
    (shorter_than_its_header, "train_000001", "truncated: 5 bytes is shorter than the 1024-byte header"),
    (wrong_magic, "train_000002", "bad magic number 20240801 (expected 20240520)"),
    (wrong_version, "train_000003", "unsupported shard version 7 (expected 1)"),
    (not_gpt2, "val_000000", "token 17 is 50257, not a GPT-2 token (ids < 50257)"),
]


@pytest.mark.parametrize("spoil,shard,fragment", BAD, ids=[b[0].__name__ for b in BAD])
def test_a_bad_shard_is_one_line_naming_it_and_never_enters(repo, tmp_path, capsys, spoil, shard, fragment):
    bad = repo / f"finewebedu_{shard}.bin"
    spoil(bad)
    out = tmp_path / "out"
    argv = ["prepare", "--source", f"hf-shards:{repo}", "--out", out, "--val-tokens", 100]
    line, _ = assert_one_line_error(capsys, argv, fragment)
    assert f"{bad}: " in line
    kept = json.loads((out / "manifest.json").read_text())
    assert not kept["complete"] and not list(out.glob(".*.tmp"))
    assert files(out) == sorted(["manifest.json", *(s["file"] for s in kept["shards"])])
    assert f"{shard}.bin" not in files(out)
    shards_before = {"val_000000": 0, "train_000001": 1, "train_000002": 2, "train_000003": 3}[shard]
    assert len(kept["shards"]) == shards_before  # the good ones before it are kept, to resume from


def test_options_and_sources_that_do_not_fit(repo, tmp_path, capsys):
    out = tmp_path / "o"
    txt = tmp_path / "a.txt"
    txt.write_text("hello")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ([txt, "--max-shards", 2], "max_shards is for hf-shards: sources"),
        ([f"hf-shards:{repo}", "--shard-tokens", 10], "shard_tokens does not apply to hf-shards: sources"),
        ([f"hf-shards:{repo}", "--workers", 2], "workers does not apply to hf-shards: sources"),
        ([f"hf-shards:{repo}", "--max-shards", 0], "max_shards must be at least 1, got 0"),
        ([f"hf-shards:{repo}", txt], "hf-shards: takes one source at a time, not 2"),
        ([f"hf-shards:{repo}", "--revision", "main"], "revision is for hub data sets"),
        ([f"hf-shards:{tmp_path}/nowhere"], "no such directory, and not a hub data set's name"),
        (["hf-shards:"], "no such directory, and not a hub data set's name"),
        ([f"hf-shards:{empty}"], "no llm.c shards in it (files like fineweb_train_000001.bin)"),
    ]
    for source, fragment in cases:
        assert_one_line_error(capsys, ["prepare", "--source", *source, "--out", out], fragment)
    (repo / "finewebedu_val_000000.bin").unlink()
    assert_one_line_error(capsys, ["prepare", "--source", f"hf-shards:{repo}", "--out", out], "no val shard")
    (repo / "sub").mkdir()
    llmc_shard(repo / "sub" / "fineweb_train_000001.bin", documents(100, 0))
    fragment = "would both be train_000001.bin"
    assert_one_line_error(
        capsys, ["prepare", "--source", f"hf-shards:{repo}", "--out", out, "--val-tokens", 0], fragment
    )
    assert not out.exists() or files(out) == []  # nothing written by any of them
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train_000001.bin").write_bytes(b"someone else's")
    assert_one_line_error(
        capsys, ["prepare", "--source", f"hf-shards:{repo}", "--out", mine], "holds shards no manifest lists"
    )


def test_the_hub_offline_or_unreachable_is_one_line(tmp_path, monkeypatch, capsys):
    pytest.importorskip("huggingface_hub")
    argv = ["prepare", "--source", "hf-shards:kjj0/finewebedu10B-gpt2", "--out", tmp_path / "o"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_one_line_error(
        capsys, argv, "cannot download kjj0/finewebedu10B-gpt2 from the Hugging Face hub (offline mode"
    )
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens: refused at once
    assert_one_line_error(capsys, argv, "127.0.0.1:9 unreachable")
    assert files(tmp_path / "o") == []


def test_each_linked_shard_is_on_disk_before_a_manifest_lists_it(repo, tmp_path, monkeypatch):
    """huggingface_hub never fsyncs its blobs, and a link shares them: the shard's data is flushed
    (fsync of its inode) before the manifest that lists it is published."""
    import os

    real_fsync, synced = os.fsync, set()

    def recording_fsync(fd):
        synced.add(os.fstat(fd).st_ino)
        real_fsync(fd)

    def checked_write(out, manifest):
        for entry in manifest["shards"]:
            assert (out / entry["file"]).stat().st_ino in synced, f"{entry['file']} listed before its fsync"
        real_write(out, manifest)

    real_write = hubshards.write_manifest
    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(hubshards, "write_manifest", checked_write)
    m = fetch(repo, tmp_path / "out")
    assert len(m["shards"]) == 4 and m["complete"]
    linked = (tmp_path / "out" / m["shards"][1]["file"]).stat()
    assert linked.st_nlink == 2 and linked.st_ino in synced  # a link to the source, not a copy
