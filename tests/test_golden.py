"""Refactors change no loss: fixed-seed CPU runs (fp32, no compile) must take the steps recorded in
golden_losses.json, which was first written by the code before the `Trainer` refactor.

Bit-identity is a property of one machine: each recording keeps the full fingerprint of the machine
that made it (CPU vendor, family, model and the ISA extensions the kernels dispatch on, torch's
version, its MKL and oneDNN builds, the kernel family, the thread count). On a machine with the same
fingerprint the losses must be equal to the last bit. Elsewhere the kernels sum in another order and
each step may differ by rounding, amplified by training: then the test compares with a recording of
the same kernel family if there is one (else any) to RELATIVE, and says so in a warning naming both.

RELATIVE is set between two measurements (benchmarks/RESULTS.md, "Golden losses"): the largest
difference between recordings of different machines (AVX2, AMD AVX-512-BF16, Intel AMX: at most
8.1e-6 relative over the 12 steps) and the smallest change of training we want caught (max_lr 1%
higher moves the losses by 4.4e-3 relative; one warmup step fewer by 1.7e-2): 1e-4 is 12x the first
and 44x below the second.

A change that is meant to change training regenerates the file on purpose (on every machine kind
where it can; entries of other machines stay, compared with the tolerance):
GPT2REPRO_WRITE_GOLDEN=1 pytest tests/test_golden.py (and says so in its commit)."""

import json
import os
import platform
import re
import warnings

import pytest
import torch
from helpers import losses, run_to_end, train_argv

from conftest import ROOT
from gpt2repro.config.presets import train_config
from gpt2repro.training.train import train

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
RELATIVE = 1e-4
THREADS = 1  # the recorded runs' torch threads, as make test's workers run (the 2-rank run: one per rank)
ISA = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "asimd", "sve")


def fingerprint() -> dict:
    """What decides the order in which this machine's kernels sum."""
    cpu = {}
    if os.path.exists("/proc/cpuinfo"):
        text = open("/proc/cpuinfo").read().split("\n\n")[0]
        cpu = dict(
            re.findall(r"^(vendor_id|cpu family|model|model name|flags|Features)\s*: (.*)$", text, re.M)
        )
    flags = set((cpu.pop("flags", "") + " " + cpu.pop("Features", "")).split())
    lines = [line.strip(" -") for line in torch.__config__.show().splitlines()]
    builds = [
        line for line in lines if "Math Kernel" in line or line.startswith(("Intel(R) MKL-DNN", "oneDNN"))
    ]
    return {
        **cpu,
        "machine": platform.machine(),
        "isa": sorted(flags & set(ISA)),
        "torch": torch.__version__,
        "builds": builds,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": THREADS,
    }


def _losses(run_dir) -> list[float]:
    return [loss for _, loss in sorted(losses(run_dir).items())]


def _two_ranks(data_dir, out) -> list[float]:
    run_to_end([*train_argv(data_dir, "--out", out), *RUNS["cpu-tiny-shuffled"]], nproc=2)
    return _losses(out)


def _all_runs(data_dir, tmp_path) -> dict[str, list[float]]:
    """The recorded runs, with THREADS torch threads whatever the test process has (make test's
    workers have 1): the thread count is part of the fingerprint."""
    got, threads = {}, torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        for name, overrides in RUNS.items():
            train(train_config("cpu-tiny", overrides), data_dir, tmp_path / name)
            got[name] = _losses(tmp_path / name)
    finally:
        torch.set_num_threads(threads)
    got[TWO_RANKS] = _two_ranks(data_dir, tmp_path / TWO_RANKS)
    return got


def _recording(recorded: list[dict], here: dict) -> tuple[dict, bool]:
    """This machine's recording (exact), or one of the same kernel family, or any (tolerance)."""
    for entry in recorded:
        if entry["fingerprint"] == here:
            return entry, True
    same_family = [e for e in recorded if e["fingerprint"].get("capability") == here["capability"]]
    return (same_family or recorded)[0], False


@pytest.mark.slow
def test_losses_are_bit_identical_to_the_golden_file(data_dir, tmp_path):
    got, here = _all_runs(data_dir, tmp_path), fingerprint()
    recorded = json.loads(GOLDEN.read_text())["recordings"]
    if os.environ.get("GPT2REPRO_WRITE_GOLDEN") == "1":
        others = [e for e in recorded if e["fingerprint"] != here]
        text = json.dumps({"recordings": [*others, {"fingerprint": here, "losses": got}]}, indent=1)
        GOLDEN.write_text(text + "\n")
    entry, exact = _recording(recorded, here)
    golden = entry["losses"]
    assert set(got) == set(golden)
    if not exact:
        warnings.warn(
            f"golden losses: no recording from this machine ({here}); compared with one from "
            f"{entry['fingerprint']} to {RELATIVE:g} relative",
            stacklevel=1,
        )
    for name in golden:
        assert len(got[name]) == 12
        if exact:
            assert got[name] == golden[name], name  # exactly equal floats, step by step
        else:
            assert got[name] == pytest.approx(golden[name], rel=RELATIVE, abs=0), name


def test_the_golden_comparison_is_exact_only_on_the_recording_machine():
    here = fingerprint()
    other_cpu = {**here, "vendor_id": "AuthenticAMD" if here.get("vendor_id") != "AuthenticAMD" else "x"}
    recorded = [
        {"fingerprint": other_cpu, "losses": {}},
        {"fingerprint": {"capability": "NONE"}, "losses": {}},
    ]
    assert _recording(recorded, here) == (recorded[0], False)  # same family, another CPU: tolerance
    assert _recording([*recorded, {"fingerprint": here, "losses": {}}], here)[1] is True
