"""Refactors change no loss: fixed-seed CPU runs (fp32, no compile) must take exactly the steps
recorded in golden_losses.json, which was written by the code before the `Trainer` refactor.
Recorded per CPU kernel family (torch's CPU capability: AVX2, AVX512, ...): exact on the family that
recorded it; on another one, whose kernels sum in another order, to 1e-4 relative.

A change that is meant to change training regenerates the file on purpose:
GPT2REPRO_WRITE_GOLDEN=1 pytest tests/test_golden.py (and says so in its commit)."""

import json
import os

import pytest
import torch
from helpers import losses, run_to_end, train_argv

from conftest import ROOT
from gpt2repro.presets import train_config
from gpt2repro.train import train

GOLDEN = ROOT / "tests" / "golden_losses.json"
COMMON = [
    "max_steps=12",
    "dtype=fp32",
    "compile=false",
    "val_every=0",
    "hellaswag_every=0",
    "sample_every=0",
    "ckpt_every=0",
    "log_every=0",
]
RUNS = {
    "cpu-tiny-unshuffled": COMMON + ["shuffle=false"],
    "cpu-tiny-shuffled": COMMON + ["shuffle=true"],
}
TWO_RANKS = "cpu-tiny-shuffled-2-ranks-gloo"


def _losses(run_dir) -> list[float]:
    return [loss for _, loss in sorted(losses(run_dir).items())]


def _two_ranks(data_dir, out) -> list[float]:
    run_to_end([*train_argv(data_dir, "--out", out), *RUNS["cpu-tiny-shuffled"]], nproc=2)
    return _losses(out)


def _all_runs(data_dir, tmp_path) -> dict[str, list[float]]:
    got = {}
    for name, overrides in RUNS.items():
        train(train_config("cpu-tiny", overrides), data_dir, tmp_path / name)
        got[name] = _losses(tmp_path / name)
    got[TWO_RANKS] = _two_ranks(data_dir, tmp_path / TWO_RANKS)
    return got


@pytest.mark.slow
def test_losses_are_bit_identical_to_the_golden_file(data_dir, tmp_path):
    got = _all_runs(data_dir, tmp_path)
    family = torch.backends.cpu.get_cpu_capability()
    recorded = json.loads(GOLDEN.read_text())
    if os.environ.get("GPT2REPRO_WRITE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({**recorded, family: got}, indent=1) + "\n")
    golden = recorded.get(family) or next(iter(recorded.values()))
    assert set(got) == set(golden)
    for name in golden:
        assert len(got[name]) == 12
        if family in recorded:
            assert got[name] == golden[name], name  # exactly equal floats, step by step
        else:
            assert got[name] == pytest.approx(golden[name], rel=1e-4), name
