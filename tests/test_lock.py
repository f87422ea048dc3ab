"""One writer per directory: a second `train`, `prepare` or `export` into a directory being written
stops at once, naming the holder, and leaves the first one's work as it would be alone; a holder
killed with -9 (its forked workers still running) leaves no stale lock; readers never block."""

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers import EVERY_RANK_REPORTS, SMALL, assert_one_line_error, launch, losses, small_cfg, train_argv

from conftest import ROOT, shared_file
from gpt2repro.checkpoint import ckptdir, gathered
from gpt2repro.cli import main
from gpt2repro.data import prepare as prep
from gpt2repro.files.lock import LOCK_NAME, DirLock, LockError
from gpt2repro.interop.hf import export_hf
from gpt2repro.training import train as tr

HOLDER = """
import os, sys, time
from gpt2repro.files.lock import DirLock
lock = DirLock(sys.argv[1], "train").acquire()
child = os.fork()  # a worker forked while the lock is held, as the tokenizer pool is
if child == 0:
    os.write(1, b"worker\\n")  # its fork handlers have run: the lock's descriptor is closed here
    time.sleep(60)
    os._exit(0)
os.write(1, f"{child}\\n".encode())  # one write each: the two lines never interleave
time.sleep(60)
"""


def _holder_info(directory):
    try:
        return json.loads((directory / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return None


def _wait_for_lock(directory, pid, timeout=120):
    """Until the process `pid` holds the directory's lock."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = _holder_info(directory)
        if info and info["pid"] == pid:
            return info
        time.sleep(0.05)
    raise AssertionError(f"{pid} never took the lock of {directory}")


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    with DirLock(tmp_path, "train"):
        info = json.loads((tmp_path / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        started = time.time()
        with pytest.raises(LockError) as refused:
            DirLock(tmp_path, "prepare").acquire()
        assert time.time() - started < 5
        message = str(refused.value)
        assert (
            f"{tmp_path} is being written by gpt2repro train (pid {os.getpid()} on {info['host']}" in message
        )
        assert f"started {info['started']})" in message
    assert not (tmp_path / LOCK_NAME).exists()  # released and removed
    with DirLock(tmp_path, "prepare"):  # free again
        pass


def test_a_file_system_without_locks_is_written_with_a_warning(tmp_path, monkeypatch, capsys):
    def unsupported(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", unsupported)
    with DirLock(tmp_path, "train"):
        assert "does not lock files (No locks available)" in capsys.readouterr().err
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.slow
def test_a_holder_killed_with_its_workers_running_leaves_no_stale_lock(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines = {proc.stdout.readline().strip() for _ in range(2)}  # the worker is running, and its pid
    assert "worker" in lines and len(lines) == 2, (
        lines,
        proc.poll(),
        proc.poll() is not None and proc.stderr.read(),
    )
    child = int((lines - {"worker"}).pop())
    try:
        with pytest.raises(LockError, match=f"pid {proc.pid} on"):
            DirLock(tmp_path, "train").acquire()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        os.kill(child, 0)  # the forked worker still runs...
        with DirLock(tmp_path, "train"):  # ...and the lock is free all the same
            assert _holder_info(tmp_path)["pid"] == os.getpid()
    finally:
        proc.kill()
        os.kill(child, signal.SIGKILL)


@pytest.mark.slow
def test_train_prepare_and_export_refuse_a_held_directory(data_dir, run_dir, tmp_path, capsys, enc):
    run = tmp_path / "run"
    tr.train(small_cfg("max_steps=2"), data_dir, run)
    before = {p.name: p.read_bytes() for p in ckptdir.latest(run).iterdir()}
    with DirLock(run, "train"):
        for extra in ([], ["resume=never", "overwrite=true"]):  # overwrite deletes only under the lock
            argv = [*train_argv(data_dir, "--out", run), *SMALL, "max_steps=4", *extra]
            assert_one_line_error(
                capsys, argv, f"{run} is being written by gpt2repro train (pid {os.getpid()}"
            )
    assert {p.name: p.read_bytes() for p in ckptdir.latest(run).iterdir()} == before
    assert sorted(losses(run)) == [0, 1]
    src = shared_file("tinyshakespeare.txt")
    with DirLock(tmp_path / "data", "prepare"):
        argv = ["prepare", "--source", src, "--out", tmp_path / "data", "--shard-tokens", "40000"]
        assert_one_line_error(capsys, argv, "data is being written by gpt2repro prepare")
    assert [p.name for p in (tmp_path / "data").iterdir()] == []
    with DirLock(tmp_path / "hf", "export", beside=True):
        argv = ["export", "--checkpoint", run_dir, "--out", tmp_path / "hf"]
        assert_one_line_error(capsys, argv, "hf is being written by gpt2repro export")
        with pytest.raises(LockError):
            export_hf(gathered.load_model(run_dir), tmp_path / "hf")
        # readers do not block
        assert main(["verify", str(run)]) == 0 and main(["sample", "--checkpoint", str(run), "-n", "1"]) == 0
    assert not (tmp_path / "hf").exists() and not (tmp_path / ".hf.lock").exists()
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(tmp_path / "hf")]) == 0


def _stopped_holder(proc, directory):
    """Pause `proc` once it holds the lock of `directory`, so a second writer meets it mid-run."""
    _wait_for_lock(directory, proc.pid)
    proc.send_signal(signal.SIGSTOP)


@pytest.mark.slow
def test_two_trainers_in_one_directory(data_dir, tmp_path, capsys):
    args = [*train_argv(data_dir, *SMALL), "max_steps=8", "ckpt_every=2", "shuffle=true"]
    alone = launch(*args, "--out", tmp_path / "alone")
    assert alone.wait(timeout=300) == 0
    first = launch(*args, "--out", tmp_path / "run")
    _stopped_holder(first, tmp_path / "run")
    try:
        started = time.time()
        assert_one_line_error(capsys, [*args, "--out", tmp_path / "run"], f"(pid {first.pid} on")
        assert time.time() - started < 30  # refused before any model or data is built
    finally:
        first.send_signal(signal.SIGCONT)
    out = first.communicate(timeout=300)[0]
    assert first.returncode == 0, out
    lines, alone_lines = ((tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("run", "alone"))
    assert len(lines) == len(alone_lines) == 9  # the data's sources and 8 steps: the refused one wrote none
    assert losses(tmp_path / "run") == losses(tmp_path / "alone")
    for name in ("step_00000004", "step_00000006", "step_00000008"):
        ours, theirs = (tmp_path / d / "checkpoints" / name / "model.safetensors" for d in ("run", "alone"))
        assert ours.read_bytes() == theirs.read_bytes()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_two_prepares_and_a_killed_one(tmp_path, capsys, enc):
    src = shared_file("tinyshakespeare.txt")
    opts = ["--shard-tokens", "20000", "--val-tokens", "10000", "--workers", "2"]
    alone = prep.prepare([str(src)], tmp_path / "alone", shard_tokens=20000, val_tokens=10000, progress=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

    def start(out):
        argv = [sys.executable, "-m", "gpt2repro", "prepare", "--source", str(src), "--out", str(out), *opts]
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    first = start(tmp_path / "out")
    _stopped_holder(first, tmp_path / "out")
    try:
        assert_one_line_error(
            capsys, ["prepare", "--source", src, "--out", tmp_path / "out", *opts], f"(pid {first.pid} on"
        )
    finally:
        first.send_signal(signal.SIGCONT)
    out = first.communicate(timeout=300)[0]
    assert first.returncode == 0, out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in alone["shards"]]
    killed = start(tmp_path / "killed")  # kill -9 with its tokenizer workers running
    _wait_for_lock(tmp_path / "killed", killed.pid)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert main(["prepare", "--source", str(src), "--out", str(tmp_path / "killed"), *opts]) == 0
    manifest = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in alone["shards"]]


@pytest.mark.slow
def test_every_rank_learns_the_run_directory_is_taken(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")  # as CI has it: the two ranks' lines must not run together
    run = tmp_path / "run"
    with DirLock(run, "train"):
        started = time.time()
        proc = launch(*train_argv(data_dir, *SMALL), "--out", run, nproc=2, launcher=EVERY_RANK_REPORTS)
        out = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0 and time.time() - started < 120, out
    errors = [line for line in out.splitlines() if line.startswith("gpt2repro: error:")]
    assert len(errors) == 2, out  # rank 0 names the holder; rank 1 stops too instead of waiting
    assert any(f"is being written by gpt2repro train (pid {os.getpid()}" in e for e in errors)
    assert any("rank 0 could not lock the run directory" in e for e in errors)
    assert not (run / "checkpoints").exists()
