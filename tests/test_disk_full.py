"""A full, read-only or vanished disk while writing a checkpoint, an export, metrics, samples, a plot
or an eval's outputs: one line naming the path, what was being written, the space free (and needed,
where known beforehand) and, for training, the last good checkpoint; nothing published is lost and
no temporary is left. Failures are injected in the write path (the errors a full disk raises, or
/dev/full); where tmpfs can be mounted (root), a real small disk too."""

import errno
import os
import re
import resource
import shutil
import signal
import subprocess

import pytest
import torch
from helpers import EVERY_RANK_REPORTS, SMALL, assert_one_line_error, launch, losses
from safetensors import SafetensorError

from conftest import shared_file
from gpt2repro.checkpoint import checkpointer, ckptdir, gathered
from gpt2repro.cli import main
from gpt2repro.files import fsio
from gpt2repro.files.fsio import AppendFile, AtomicDir, AtomicFile, WriteError
from gpt2repro.interop import hf as hf_mod

TRAIN = ["train", "--preset", "cpu-tiny", *SMALL, "ckpt_every=2"]


def _no_temporaries(directory):
    return [p.name for p in directory.rglob(".*") if p.name.endswith((".tmp", ".old", ".lock"))] == []


@pytest.fixture
def small_disk(tmp_path):
    """mount(MB) -> a tmpfs of that size (skips where mounting is not permitted)."""
    mounted = []

    def mount(mb):
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(where)], capture_output=True
        )
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_refused_write_names_path_what_and_space_and_keeps_the_old(tmp_path):
    target = tmp_path / "d"
    with AtomicDir(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with (
        pytest.raises(WriteError) as refused,
        AtomicDir(target, replace=True, what="a thing", needed=5000) as tmp,
    ):
        (tmp / "a.txt").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(refused.value).startswith(f"{target}: cannot write a thing: no space left on device (")
    assert str(refused.value).endswith(" free, at least 5.0 KB needed)")
    assert (target / "a.txt").read_text() == "old" and _no_temporaries(tmp_path)
    huge = fsio.free_bytes(tmp_path) * 2
    with pytest.raises(WriteError, match=r"cannot write a thing: not enough free space \(.* free, at least"):
        AtomicDir(target, replace=True, what="a thing", needed=huge)  # refused before writing anything
    for unrelated in (RuntimeError("a bug"), FileNotFoundError(errno.ENOENT, "an input", "x.txt")):
        with pytest.raises(type(unrelated)), AtomicDir(target, replace=True) as tmp:
            raise unrelated  # not the file system's fault: passes through untouched
    out = AtomicFile(tmp_path / "gone" / "r.json", "the results")
    shutil.rmtree(tmp_path / "gone")  # the output directory vanishes mid-write
    with pytest.raises(
        WriteError, match=r"r.json: cannot write the results: the output directory vanished \("
    ):
        out.commit()
    assert _no_temporaries(tmp_path)


def test_a_log_line_the_disk_refuses_is_cut_off_again(tmp_path):
    log = AppendFile(tmp_path / "metrics.jsonl", "metrics")
    log.write('{"step": 0}\n')
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20, hard))  # the next line gets 8 bytes in, then fails
    try:
        with pytest.raises(WriteError, match="metrics.jsonl: cannot write metrics: file too large"):
            log.write('{"step": 1, "loss": 10.5}\n')
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 0}\n'  # no torn line
    (tmp_path / "metrics.jsonl").unlink()  # the run directory deleted under a running job
    with pytest.raises(
        WriteError, match="metrics.jsonl: cannot write metrics: the output directory vanished"
    ):
        log.write('{"step": 2}\n')
    log.close()
    full = AppendFile("/dev/full", "samples")
    with pytest.raises(WriteError, match="/dev/full: cannot write samples: no space left on device"):
        full.write("step 3: 'text'\n")
    full.close()


def test_torch_writer_on_a_real_full_disk(small_disk):
    disk = small_disk(2)
    with pytest.raises(WriteError, match="cannot write weights: no space left on device"):
        with AtomicDir(disk / "ckpt", what="weights") as tmp:
            torch.save({"w": torch.zeros(1_000_000)}, tmp / "w.pt")  # torch says only "unexpected pos"
    assert list(disk.iterdir()) == []


def _ckpt_files(run):
    return {p.name: p.read_bytes() for p in ckptdir.latest(run).iterdir()}


def _ok(capsys, argv):
    code = main([str(a) for a in argv])
    assert code == 0, capsys.readouterr()
    return capsys.readouterr().out


def test_a_vanished_run_directory_is_not_quietly_made_again(tmp_path):
    from gpt2repro.config.presets import train_config

    with pytest.raises(
        WriteError, match="step_00000002: cannot write checkpoint step 2: the output directory vanished"
    ):
        gathered.save(tmp_path / "deleted", 2, {}, {}, {}, train_config("cpu-tiny"), 3)
    assert not (tmp_path / "deleted").exists()


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint(data_dir, tmp_path, capsys, monkeypatch):
    run, straight = tmp_path / "run", tmp_path / "straight"
    _ok(capsys, [*TRAIN, "--data", data_dir, "--out", straight, "max_steps=4"])
    _ok(capsys, [*TRAIN, "--data", data_dir, "--out", run, "max_steps=2"])
    before = _ckpt_files(run)

    def disk_full(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gathered.torch, "save", disk_full)
    fragment = "step_00000004: cannot write checkpoint step 4: no space left on device ("
    line, out = assert_one_line_error(
        capsys, [*TRAIN, "--data", data_dir, "--out", run, "max_steps=4"], fragment
    )
    assert line.endswith(" needed); last good checkpoint: step_00000002"), line
    monkeypatch.undo()
    assert _ckpt_files(run) == before and _no_temporaries(run)
    assert sorted(losses(run)) == [0, 1, 2, 3]  # every metrics line whole
    _ok(capsys, [*TRAIN, "--data", data_dir, "--out", run, "max_steps=4"])
    assert losses(run) == losses(straight)  # nothing lost: the rerun resumed exactly


def test_too_little_space_is_warned_at_start_and_refused_before_writing(
    data_dir, tmp_path, capsys, monkeypatch
):
    run = tmp_path / "run"
    _ok(capsys, [*TRAIN, "--data", data_dir, "--out", run, "max_steps=2"])
    before = _ckpt_files(run)
    monkeypatch.setattr(fsio, "free_bytes", lambda path: 10_000_000)  # a disk with 10 MB left
    monkeypatch.setattr(checkpointer, "free_bytes", lambda path: 10_000_000)
    fragment = "step_00000004: cannot write checkpoint step 4: not enough free space (10.0 MB free, at least"
    line, out = assert_one_line_error(
        capsys, [*TRAIN, "--data", data_dir, "--out", run, "max_steps=4"], fragment
    )
    assert line.endswith(" needed); last good checkpoint: step_00000002"), line
    assert re.search(
        rf"warning: {run}: 10.0 MB free \(and .* MB in its checkpoints\), but keep_last=3 checkpoints and "
        r"the one being written take about .* MB \(.* MB each\)",
        out,
    ), out
    monkeypatch.undo()
    assert _ckpt_files(run) == before and _no_temporaries(run)


def test_a_real_small_disk_ends_training_in_one_line(data_dir, small_disk, capsys):
    """The issue's case: the second checkpoint does not fit (one holds weights and Adam's moments)."""
    run = small_disk(60) / "run"
    argv = [*TRAIN, "--data", data_dir, "--out", run, "max_steps=4", "keep_last=3"]
    line, out = assert_one_line_error(capsys, argv, "step_00000004: cannot write checkpoint step 4: ")
    assert line.endswith("; last good checkpoint: step_00000002"), line
    assert ckptdir.verify(ckptdir.latest(run))["step"] == 2 and _no_temporaries(run)


@pytest.mark.slow
def test_a_sharded_checkpoint_that_does_not_fit_stops_every_rank_in_one_line(data_dir, small_disk):
    """FSDP on 2 ranks: rank 0 refuses the second checkpoint before any rank writes, and every rank
    stops with one line (none is left waiting in a collective); the first one intact, no temporary."""
    run = small_disk(60) / "run"
    proc = launch(
        *TRAIN,
        "--data",
        data_dir,
        "--out",
        run,
        "fsdp=true",
        "max_steps=4",
        nproc=2,
        launcher=EVERY_RANK_REPORTS,
    )
    out = proc.communicate(timeout=300)[0]
    errors = [line for line in out.splitlines() if line.startswith("gpt2repro: error: ")]
    assert proc.returncode != 0 and len(errors) == 2, out[-3000:]
    refused = "step_00000004: cannot write checkpoint step 4: not enough free space ("
    assert any(refused in e and e.endswith("; last good checkpoint: step_00000002") for e in errors), errors
    assert any("step_00000004: rank 0 could not create the checkpoint" in e for e in errors), errors
    assert ckptdir.verify(ckptdir.latest(run))["step"] == 2 and _no_temporaries(run)


def _disk_full_safetensors(state, path, metadata=None):
    with open(path, "wb") as f:
        f.write(b"partial")
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_a_full_disk_during_an_export(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(hf_mod, "save_file", _disk_full_safetensors)
    argv = ["export", "--checkpoint", run_dir, "--out", tmp_path / "hf"]
    line, out = assert_one_line_error(capsys, argv, "hf: cannot write the export: no space left on device (")
    assert line.endswith(" needed)"), line
    assert list(tmp_path.iterdir()) == []  # no directory, temporary or lock left
    monkeypatch.undo()
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(tmp_path / "hf")]) == 0


def test_an_export_to_a_real_small_disk(run_dir, small_disk, capsys):
    disk = small_disk(4)
    argv = ["export", "--checkpoint", run_dir, "--out", disk / "hf"]
    assert_one_line_error(
        capsys, argv, "hf: cannot write the export: not enough free space (4.2 MB free, at least"
    )
    assert list(disk.iterdir()) == []


def _fsync_fails_under(directory):
    """os.fsync failing with ENOSPC for files under `directory`, as it does on a full NFS or thin disk."""
    real = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(directory)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    return fsync


def test_a_full_disk_while_writing_eval_outputs(tmp_path, capsys, monkeypatch):
    shared_file("hellaswag_val.jsonl.gz")
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(os, "fsync", _fsync_fails_under(out))
    argv = ["eval", "hellaswag", "--hf", shared_file("tiny-gpt2"), "--limit", "2"]
    argv += ["--json", out / "r.json", "--predictions", out / "p.jsonl"]
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 2 and "hellaswag [completion] n=2" in captured.out  # the scores are not lost
    assert (
        captured.err.strip()
        == (
            f"gpt2repro: error: {out / 'r.json'}: cannot write the results: no space left on device "
            f"({fsio.human_bytes(fsio.free_bytes(out))} free); the scores are printed above"
        )
        or captured.err.count("\n") == 1
        and "r.json: cannot write the results" in captured.err
    ), captured.err
    assert list(out.iterdir()) == []


def _full_disk_for(monkeypatch, name: str) -> None:
    """Every write to files called `name` fails with ENOSPC: they are opened as /dev/full (a symbolic
    link to it would be refused: nothing is written through a link)."""
    real_open = os.open

    def opening(path, flags, *args):
        if os.fspath(path).endswith(name):
            return real_open("/dev/full", os.O_WRONLY)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", opening)


def test_a_full_disk_while_logging_metrics_and_samples(data_dir, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    _ok(capsys, [*TRAIN, "--data", data_dir, "--out", run, "max_steps=2"])
    kept = (run / "metrics.jsonl").read_text()
    fragment = "metrics.jsonl: cannot write metrics: no space left on device ("
    with monkeypatch.context() as patch:
        _full_disk_for(patch, "metrics.jsonl")
        line, out = assert_one_line_error(
            capsys, [*TRAIN, "--data", data_dir, "--out", run, "max_steps=4"], fragment
        )
    assert line.endswith("; last good checkpoint: step_00000002"), line
    argv = [*TRAIN, "--data", data_dir, "--out", run, "max_steps=4", "sample_every=1", "sample_tokens=4"]
    with monkeypatch.context() as patch:
        _full_disk_for(patch, "samples.txt")
        line, out = assert_one_line_error(
            capsys, argv, "samples.txt: cannot write samples: no space left on device ("
        )
    assert line.endswith("; last good checkpoint: step_00000002"), line
    assert (run / "metrics.jsonl").read_text().startswith(kept)


def test_a_plot_is_replaced_whole_or_not_at_all(data_dir, run_dir, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from gpt2repro.training.plot import plot_run

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = plot_run(run).read_bytes()

    def half_then_full(self, f, **kwargs):
        f.write(before[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_then_full)
    with pytest.raises(WriteError, match=r"curves.png: cannot write the plot: no space left on device"):
        plot_run(run)
    assert (run / "curves.png").read_bytes() == before and _no_temporaries(run)
