"""Paths the project writes to, met by real symbolic links, directories and FIFOs planted where it
creates files: nothing is ever written through a planted link (its target keeps its bytes), a lock
path that is not a regular file is refused with one line, one directory reached by two paths has
one lock, an export onto a link goes into the directory it names, and the last copy of a
checkpoint set aside while its replacement was renamed in is never deleted."""

import os
import shutil

import pytest
from helpers import SMALL, assert_one_line_error, train_argv

from conftest import shared_file
from gpt2repro.files import fsio
from gpt2repro.files.fsio import AppendFile, AtomicDir, WriteError, atomic_write_text, remove_leftovers
from gpt2repro.files.lock import LOCK_NAME, DirLock, LockError

SECRET = b"the victim's file: must keep these bytes\n"


@pytest.fixture
def victim(tmp_path):
    """A file outside every directory written to, which planted links point at."""
    path = tmp_path / "victim" / "precious.txt"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


def _plant(path, kind, victim):
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "symlink":
        path.symlink_to(victim)
    elif kind == "dangling symlink":
        path.symlink_to(victim.parent / "not-yet")
    elif kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)


KINDS = ["symlink", "dangling symlink", "directory", "fifo"]


@pytest.mark.parametrize("beside", [False, True], ids=["in", "beside"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_lock_path_that_is_not_a_regular_file_is_refused(tmp_path, victim, kind, beside):
    out = tmp_path / "out"
    lock = DirLock(out, "prepare", beside=beside)
    _plant(lock.path, kind, victim)
    with pytest.raises(LockError, match="not a regular file; nothing is written through it") as refused:
        lock.acquire()
    assert str(lock.path) in str(refused.value) and "\n" not in str(refused.value)
    assert victim.read_bytes() == SECRET and not (victim.parent / "not-yet").exists()


def test_prepare_train_and_export_refuse_a_planted_lock_link(tmp_path, victim, data_dir, run_dir, capsys):
    for out in (tmp_path / "data", tmp_path / "run"):
        _plant(out / LOCK_NAME, "symlink", victim)
    _plant(tmp_path / ".hf.lock", "symlink", victim)
    src = shared_file("tinyshakespeare.txt")
    commands = [
        ["prepare", "--source", src, "--out", tmp_path / "data"],
        [*train_argv(data_dir, "--out", tmp_path / "run"), *SMALL, "max_steps=1"],
        ["export", "--checkpoint", run_dir, "--out", tmp_path / "hf"],
    ]
    for argv in commands:
        assert_one_line_error(capsys, argv, "the lock file is a symbolic link")
        assert victim.read_bytes() == SECRET
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [LOCK_NAME]
    assert not (tmp_path / "hf").exists()


def test_one_directory_through_two_paths_has_one_lock(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with DirLock(tmp_path / "link", "export", beside=True):
        with pytest.raises(LockError, match="is being written by gpt2repro export"):
            DirLock(real, "export", beside=True).acquire()
        with pytest.raises(LockError, match="is being written by gpt2repro export"):
            DirLock(tmp_path / "real" / ".." / "real", "export", beside=True).acquire()
    with DirLock(real, "train"):
        with pytest.raises(LockError, match="is being written by gpt2repro train"):
            DirLock(tmp_path / "link", "train").acquire()


def test_export_onto_a_link_exports_into_the_directory_it_names(tmp_path, run_dir, capsys):
    from gpt2repro.cli import main

    target = tmp_path / "exports" / "hf"
    target.mkdir(parents=True)
    (tmp_path / "hf").symlink_to(target)
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf").is_symlink() and (target / "model.safetensors").is_file()
    assert f"exported to {target}" in capsys.readouterr().out
    assert sorted(p.name for p in target.parent.iterdir()) == ["hf"]  # no lock or temporary left
    # the same directory, now full, through either path: refused, one line
    for out in (tmp_path / "hf", target):
        assert_one_line_error(capsys, ["export", "--checkpoint", run_dir, "--out", out], "is not empty")


@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "directory", "fifo"])
def test_an_appended_log_is_never_written_through_what_was_planted(tmp_path, victim, kind):
    path = tmp_path / "run" / "metrics.jsonl"
    _plant(path, kind, victim)
    with pytest.raises(WriteError, match="cannot write metrics: it is .*nothing is written through one"):
        AppendFile(path, "metrics")
    assert victim.read_bytes() == SECRET and not (victim.parent / "not-yet").exists()


def test_a_run_refuses_a_planted_metrics_link(tmp_path, victim, data_dir, capsys):
    _plant(tmp_path / "run" / "samples.txt", "symlink", victim)
    argv = [*train_argv(data_dir, "--out", tmp_path / "run"), *SMALL, "max_steps=1"]
    assert_one_line_error(capsys, argv, "samples.txt: cannot write samples: it is a symbolic link")
    assert victim.read_bytes() == SECRET


def test_an_atomic_file_replaces_a_planted_link_never_its_target(tmp_path, victim):
    path = tmp_path / "data" / "manifest.json"
    _plant(path, "symlink", victim)
    atomic_write_text(path, "{}", "the manifest")
    assert not path.is_symlink() and path.read_text() == "{}" and victim.read_bytes() == SECRET
    _plant(tmp_path / "data" / "config.json", "directory", victim)
    with pytest.raises(WriteError, match="config.json: cannot write the config: it is a directory"):
        atomic_write_text(tmp_path / "data" / "config.json", "{}", "the config")
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.json", "manifest.json"]


def test_a_temporary_name_taken_by_a_link_is_never_written_through(tmp_path, victim, monkeypatch):
    monkeypatch.setattr(fsio.secrets, "token_hex", lambda n: "abcdef")
    (tmp_path / ".manifest.json.abcdef.tmp").symlink_to(victim)
    with pytest.raises(FileExistsError):
        atomic_write_text(tmp_path / "manifest.json", "{}")
    assert victim.read_bytes() == SECRET


def test_a_directory_replaced_over_a_link_leaves_the_target_alone(tmp_path, victim):
    step = tmp_path / "checkpoints" / "step_00000002"
    step.parent.mkdir()
    step.symlink_to(victim.parent)
    with pytest.raises(FileExistsError):  # without replace: a link is something there
        with AtomicDir(step) as tmp:
            (tmp / "a").write_text("new")
    with AtomicDir(step, replace=True) as tmp:
        (tmp / "a").write_text("new")
    assert not step.is_symlink() and (step / "a").read_text() == "new"
    assert victim.read_bytes() == SECRET and sorted(p.name for p in victim.parent.iterdir()) == [
        "precious.txt"
    ]
    assert sorted(p.name for p in step.parent.iterdir()) == ["step_00000002"]


def test_leftovers_that_are_links_go_without_their_targets(tmp_path, victim):
    (tmp_path / ".step_00000002.abcdef.tmp").symlink_to(victim.parent)
    (tmp_path / ".config.json.abcdef.tmp").symlink_to(victim)
    remove_leftovers(tmp_path)
    assert list(tmp_path.iterdir()) == [victim.parent] and victim.read_bytes() == SECRET


def _saved_twice_and_killed_between_the_renames(tmp_path):
    """Step 4 saved, then saved again and killed after setting the first copy aside: only `.old`."""
    checkpoints = tmp_path / "checkpoints"
    with AtomicDir(checkpoints / "step_00000004") as tmp:
        (tmp / "model.safetensors").write_bytes(b"first copy")
    os.replace(checkpoints / "step_00000004", checkpoints / ".step_00000004.0123456789ab.old")
    (checkpoints / ".step_00000004.ba9876543210.tmp").mkdir()  # the second copy, half-written
    return checkpoints


def test_the_last_copy_of_a_checkpoint_is_never_deleted_as_a_leftover(tmp_path):
    checkpoints = _saved_twice_and_killed_between_the_renames(tmp_path)
    (checkpoints / ".step_00000002.0123456789ab.old").mkdir()  # an old copy whose step is in place
    (checkpoints / "step_00000002").mkdir()
    remove_leftovers(checkpoints)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002", "step_00000004"]
    assert (checkpoints / "step_00000004" / "model.safetensors").read_bytes() == b"first copy"


def test_a_failed_rename_puts_the_old_copy_back(tmp_path, monkeypatch):
    step = tmp_path / "step_00000004"
    with AtomicDir(step) as tmp:
        (tmp / "model.safetensors").write_bytes(b"first copy")
    real_replace, calls = os.replace, []

    def second_rename_fails(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="Input/output error"):
        with AtomicDir(step, replace=True) as tmp:
            (tmp / "model.safetensors").write_bytes(b"second copy")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004"]
    assert (step / "model.safetensors").read_bytes() == b"first copy"


def test_pruning_and_overwrite_remove_planted_links_never_their_targets(tmp_path, victim, data_dir, capsys):
    """A step directory or checkpoints/ that is a link: pruning (keep_last) and overwrite=true remove
    the link (shutil.rmtree raised on it, a traceback) and leave the directory it names alone."""
    from helpers import run_main

    from gpt2repro.checkpoint.ckptdir import publish

    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "step_00000001").symlink_to(victim.parent)
    (checkpoints / "step_00000002").mkdir()
    publish(checkpoints / "step_00000002", keep_last=1)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000002"]
    assert victim.read_bytes() == SECRET
    run = tmp_path / "again"
    elsewhere = tmp_path / "elsewhere" / "checkpoints"
    shutil.copytree(checkpoints, elsewhere)
    run.mkdir()
    (run / "checkpoints").symlink_to(elsewhere)
    argv = [*train_argv(data_dir, "--out", run), *SMALL, "max_steps=1", "resume=never", "overwrite=true"]
    assert run_main(capsys, *argv)[0] == 0
    assert (elsewhere / "step_00000002").is_dir() and not (run / "checkpoints").is_symlink()
    assert (run / "checkpoints" / "step_00000001").is_dir()
