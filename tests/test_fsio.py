"""Atomic publishing of files (fetched shards: linked or copied) and directories (checkpoints,
exports): complete or absent, normal permissions."""

import errno
import os

import pytest

from conftest import current_umask
from gpt2repro.config.schema import model_config
from gpt2repro.files.fsio import AtomicDir, publish_copy, remove_leftovers
from gpt2repro.interop.hf import export_hf
from gpt2repro.model.gpt import GPT


def _modes(root):
    return {p.name: p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


def test_atomic_dir_appears_complete_or_not_at_all(tmp_path):
    target = tmp_path / "d"
    with pytest.raises(RuntimeError, match="boom"), AtomicDir(target) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary directory
    with AtomicDir(target) as tmp:
        (tmp / "a.txt").write_text("one")
        assert not target.exists()  # nothing visible before the commit
    assert (target / "a.txt").read_text() == "one" and list(tmp_path.iterdir()) == [target]


def test_atomic_dir_replaces_only_when_asked_and_leftovers_go_under_the_lock(tmp_path):
    target = tmp_path / "d"
    with AtomicDir(target) as tmp:
        (tmp / "a.txt").write_text("one")
    (tmp_path / ".d.1a2b3c.tmp").mkdir()  # left by a killed earlier attempt
    (tmp_path / ".d.1a2b3c.tmp" / "junk").write_text("x")
    (tmp_path / ".other.1a2b3c.tmp").write_text("another target's")
    first, second = AtomicDir(target, replace=True), AtomicDir(target, replace=True)
    assert first.tmp != second.tmp  # two writers never share a temporary name
    second.discard()
    with pytest.raises(FileExistsError, match="exists and is not empty"), AtomicDir(target) as tmp:
        (tmp / "a.txt").write_text("two")
    assert (target / "a.txt").read_text() == "one"
    with first as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".d.1a2b3c.tmp", ".other.1a2b3c.tmp", "d"]
    remove_leftovers(tmp_path, "d")  # what the holder of d's lock does first
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.1a2b3c.tmp", "d"]


def test_export_has_normal_permissions(tmp_path):
    out = export_hf(GPT(model_config("tiny")), tmp_path / "hf")
    modes = _modes(out)
    assert modes.pop("hf") == 0o777 & ~current_umask()  # was mkdtemp's 0700
    assert modes and set(modes.values()) == {0o666 & ~current_umask()}  # model.safetensors was 0600


def test_checkpoint_has_normal_permissions(run_dir):
    from gpt2repro.checkpoint import ckptdir

    ckpt = ckptdir.latest(run_dir)
    modes = _modes(ckpt)
    assert modes.pop(ckpt.name) == 0o777 & ~current_umask()
    assert set(modes.values()) == {0o666 & ~current_umask()}


def test_publish_copy_links_or_else_copies_atomically(tmp_path, monkeypatch):
    src = tmp_path / "downloaded.bin"
    src.write_bytes(b"tokens" * 1000)
    (tmp_path / "out").mkdir()
    linked = publish_copy(src, tmp_path / "out" / "a.bin")
    assert linked.read_bytes() == src.read_bytes() and linked.stat().st_ino == src.stat().st_ino

    def no_links(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    copied = publish_copy(src, tmp_path / "out" / "b.bin")
    assert copied.read_bytes() == src.read_bytes() and copied.stat().st_ino != src.stat().st_ino
    with pytest.raises(FileNotFoundError):
        publish_copy(tmp_path / "missing.bin", tmp_path / "out" / "c.bin")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.bin", "b.bin"]  # no temporary
