"""What many test modules share, in one place: the small training config, reading a run's metrics,
launching `gpt2repro` in a subprocess (alone or under torchrun), the one-line-error check, and the
one table of bad config overrides."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys

from conftest import ROOT
from gpt2repro.cli import main
from gpt2repro.config.presets import train_config

# A training run small enough for a test: 2 layers of d=64, 256-token batches of 2 micro-steps.
SMALL = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=64",
    "model.block_size=64",
    "micro_batch_size=4",
    "seq_len=32",
    "total_batch_size=256",
    "max_lr=3e-3",
    "warmup_steps=2",
    "hellaswag_every=0",
    "sample_every=0",
    "val_every=0",
    "dtype=fp32",
    "log_every=0",
]


def small_cfg(*overrides):
    return train_config("cpu-tiny", SMALL + list(overrides))


def events(run_dir, kind):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == kind]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in events(run_dir, "train")}


def as_written_before_components_saved_themselves(ckpt) -> dict:
    """Rewrite a checkpoint's state.json in the layout of the code before its components saved
    themselves (the clock's keys, `evaluated` and `metrics` at the top level; the manifest
    redone as that code recorded it); returns that state."""
    from gpt2repro.checkpoint import ckptdir
    from gpt2repro.files.fsio import sha256_file

    state = json.loads((ckpt / "state.json").read_text())
    for name in ("clock", "trainer"):
        state.update(state.pop(name))
    (ckpt / "state.json").write_text(json.dumps(state))
    ckptdir.write_manifest(ckpt, {**state["sha256"], "state.json": sha256_file(ckpt / "state.json")})
    return state


def stop_after(monkeypatch, n):
    """Make the loop see a stop request after its n-th step, as a SIGTERM would."""
    from gpt2repro.training import train as tr

    calls = {"n": 0}

    def fake(self, stop):
        calls["n"] += 1
        return tr.StopReason.SIGNAL if calls["n"] == n else None

    monkeypatch.setattr(tr.Trainer, "should_stop", fake)


def train_argv(data_dir, *extra) -> list[str]:
    """`gpt2repro train` of the cpu-tiny preset on data_dir, for a subprocess."""
    return ["train", "--preset", "cpu-tiny", "--data", str(data_dir), *map(str, extra)]


# For tests that read every rank's error line: torchrun checks its workers every 0.1 s and, once
# one has failed, terminates the rest; a rank descheduled on a loaded machine could be killed before
# writing its line. Checking every 5 s leaves each rank time to write it (the ranks fail together).
EVERY_RANK_REPORTS = ["--standalone", "--monitor-interval", "5"]


def command(*args, nproc=None, launcher=(), script=None) -> list[str]:
    """`python -m gpt2repro ARGS` (or `python SCRIPT ARGS`), under torchrun with `nproc` processes
    (and `launcher` options)."""
    # --standalone: a free port of its own, so runs on one machine at once never meet (without it every
    # run takes port 29500, and a second suite's ranks could join this one's)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    torchrun += [*launcher] if launcher else ["--standalone"]
    program = [str(script)] if script else ["-m", "gpt2repro"]
    return [*(torchrun if nproc else [sys.executable]), *program, *map(str, args)]


def subprocess_env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def launch(*args, nproc=None, launcher=(), **popen) -> subprocess.Popen:
    """Start the command; its stdout and stderr come as one text stream."""
    return subprocess.Popen(
        command(*args, nproc=nproc, launcher=launcher),
        cwd=ROOT,
        env=subprocess_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **popen,
    )


def run_script(script, *args, nproc=2, launcher=(), **env) -> subprocess.CompletedProcess:
    """`script` (a probe, or the CLI after patching something) with ARGS under torchrun, `env` added;
    it may fail: its exit code and output."""
    cmd = command(*args, nproc=nproc, launcher=launcher, script=script)
    return subprocess.run(
        cmd, cwd=ROOT, env=subprocess_env(**env), capture_output=True, text=True, timeout=300
    )


def error_lines(out: subprocess.CompletedProcess) -> list[str]:
    """The one-line errors of every process in a run's output."""
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("gpt2repro: error:")]


def run_to_end(args, nproc=None) -> str:
    """Run the command to its end; it must succeed. Its output (stdout and stderr). One process runs
    here, through the same `main` (starting Python and torch again would cost seconds a run)."""
    if nproc:
        proc = launch(*args, nproc=nproc)
        out = proc.communicate(timeout=600)[0]
        code = proc.returncode
    else:
        stream = io.StringIO()
        with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
            code = main([str(a) for a in args])
        out = stream.getvalue()
    assert code == 0, out[-3000:]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_main(capsys, *argv) -> tuple[int, str, str]:
    """`gpt2repro ARGV` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(capsys, argv, fragment):
    """The command fails with exit code 2 and exactly one line on stderr, naming `fragment`."""
    code, out, err = run_main(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("prepare:")]
    assert code == 2, (out, err)
    assert "Traceback" not in err + out
    assert len(lines) == 1 and lines[0].startswith("gpt2repro: error: "), err
    assert fragment in lines[0], lines[0]
    return lines[0], out


# Every bad override, with what its one-line error says (checked through `gpt2repro train`).
BAD_OVERRIDES = [
    (["bogus=1"], "unknown config key 'bogus'; valid keys: total_batch_size"),
    (["model.bogus=1"], "unknown config key 'model.bogus'"),
    (["max_steps=ten"], "max_steps='ten': expected int"),
    (["max_steps=1e400"], "max_steps='1e400': expected int"),
    (["shuffle=maybe"], "shuffle='maybe': expected true or false"),
    (["compile=auto"], "compile='auto': expected true or false"),
    (["max_steps"], "override 'max_steps' is not key=value"),
    (["validate=1"], "unknown config key 'validate'"),
    (["to_json=x"], "unknown config key 'to_json'"),
    (["seq_len=4096"], "seq_len=4096 exceeds model.block_size"),
    (["optimizer=sgd"], "optimizer='sgd' is not one of adamw, muon"),
    (["optimizer=muon", "fsdp=true"], "optimizer=muon with fsdp=true is not supported"),
    (["dtype=fp16", "fsdp=true"], "dtype=fp16 with fsdp=true is not supported"),
    (["schedule=wsd", "wsd_decay_fraction=0"], "wsd_decay_fraction=0.0: expected a number in (0, 1]"),
    (["target_val_loss=3", "val_every=0"], "target_val_loss needs validation"),
    (["target_core=0.2565"], "target_core needs the CORE metric: set core_every > 0"),
    (["core_every=1", "target_core=1.5"], "target_core=1.5: expected a CORE score in [0, 1]"),
    (["muon_lr=-1"], "muon_lr=-1.0: expected a number >= 0"),
    (["muon_ns_dtype=fp16"], "muon_ns_dtype='fp16' is not one of auto, bf16, fp32"),
    (["muon_split_qkv=maybe"], "muon_split_qkv='maybe': expected true or false"),
    (["max_lr=-1"], "max_lr=-1.0: expected a positive number"),
    (["max_lr=nan"], "max_lr=nan: expected a positive number"),
    (["beta1=2"], "beta1=2.0: expected a number in [0, 1)"),
    (["seed=-1"], "seed=-1: expected an integer in [0, 2^63)"),
    (["device=tpu"], "device='tpu': expected auto, cpu, cuda, cuda:N or mps"),
    (["sample_every=1", "sample_prompt="], "a non-empty sample_prompt"),
    (["grad_clip=-1"], "grad_clip=-1.0: expected a positive number"),
    (["val_every=1", "val_steps=0"], "val_steps=0 with val_every>0"),
    (["min_lr_ratio=5"], "min_lr_ratio=5.0: expected a number in [0, 1]"),
    (["eps=-1"], "eps=-1.0: expected a positive number"),
    (["weight_decay=-1"], "weight_decay=-1.0: expected a number >= 0"),
    (["sample_count=-2"], "sample_count=-2: expected an integer >= 0"),
    (["log_every=-1"], "log_every=-1: expected an integer >= 0"),
    (["model.layer_norm_epsilon=-1"], "model.layer_norm_epsilon=-1.0: expected in (0, 1)"),
    (["model.block_size=1e9"], "model.block_size=1000000000: expected at most 131072"),
    (["time_limit=inf"], "time_limit=inf: expected seconds >= 0"),
    (["dtype=fp8"], "dtype='fp8' is not one of auto, fp32, bf16, fp16"),
    (
        ["activation_checkpointing=every_0"],
        "activation_checkpointing='every_0': expected none, full or every_N",
    ),
    (
        ["sample_every=1", "sample_prompt=word" + " word" * 99],
        "the prompt is 100 tokens; this model's block_size is 64",
    ),
]


# A HellaSwag row (the official validation file's first, its endings shortened), for tests that break it field by field.
HELLASWAG_ROW = {
    "ctx": "A man is sitting on a roof. he",
    "ctx_a": "A man is sitting on a roof.",
    "ctx_b": "he",
    "activity_label": "Roof shingle removal",
    "endings": ["is using wrap.", "starts pulling up.", "is holding a rubik's cube.", "starts to climb."],
    "label": 3,
}
