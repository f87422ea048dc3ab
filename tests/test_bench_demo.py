"""`gpt2repro bench` runs and reports (speed itself is measured in benchmarks/, never asserted here),
and the demo script works end to end on a tiny budget."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, shared_file
from gpt2repro.bench import runners as bench
from gpt2repro.bench.reference import RefGPT

TINY = "2x64"


@pytest.fixture
def tiny_size(monkeypatch) -> str:
    """A bench size far below the real ones (a step at 4x256 takes seconds on one thread): these
    tests check what a bench reports, never its speed, and its code is the same at every size."""
    from gpt2repro.bench import names

    monkeypatch.setitem(names.SIZES, TINY, (2, 64, 2, 4, 64))
    return TINY


@pytest.mark.slow
def test_bench_peak_and_train_write_json(tmp_path, capsys, monkeypatch, tiny_size):
    monkeypatch.setattr(bench, "PEAK_SIZES", (256,))
    out = bench.run("peak", repeats=1, json_out=str(tmp_path / "peak.json"))
    *gemms, read = out["results"]
    assert [r["dtype"] for r in gemms] == [d for d in bench.bench_dtypes() for _ in bench.PEAK_SIZES]
    saved = json.loads((tmp_path / "peak.json").read_text())
    assert saved["machine"]["torch"] and all(r["gflop_per_s"] > 0 for r in saved["results"][:-1])
    assert read["read_bytes"] == 1 << 30 and read["read_gb_per_s"] > 0  # far past the caches
    out = bench.run("train", size=tiny_size, mode="eager", baseline="reference", repeats=1)
    impls = [r["impl"] for r in out["results"]]
    assert impls == ["ours", "reference"] and all(0 < r["mfu"] <= 1 for r in out["results"])
    assert "tok_per_s" in capsys.readouterr().out


def test_reference_model_computes_the_same_function():
    """The yardstick must do the same work: same weights give the same loss as ours."""
    import torch

    from gpt2repro.model.gpt import GPT

    cfg, _, _ = bench.size_config("4x256")
    cfg.n_layer, cfg.vocab_multiple = (
        2,
        1,
    )  # the reference softmaxes over padded ids too; compare without them
    torch.manual_seed(0)
    ours, ref = GPT(cfg), RefGPT(cfg)
    ref.load_state_dict(ours.state_dict())  # the same parameter names, no remapping
    x = torch.randint(0, 50257, (2, 16))
    y = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(x, y)[1], ref(x, y)[1], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_bench_hellaswag_checks_predictions_agree(tiny_size):
    shared_file("hellaswag_val.jsonl.gz")
    rows = bench.bench_hellaswag(tiny_size, repeats=1, device=torch.device("cpu"), n_examples=12)
    dtypes = bench.bench_dtypes()  # bf16 rows only where this CPU has native bf16 matmuls
    assert [(r["method"], r["dtype"]) for r in rows] == [
        (method, d) for method in ("batched", "one-at-a-time") for d in dtypes
    ]
    first = {r["method"]: r for r in rows if r["dtype"] == "fp32"}
    assert first["batched"]["same_predictions"] == 1.0 == first["one-at-a-time"]["same_predictions"]
    assert first["batched"]["flop_ratio"] > 1


@pytest.mark.slow
def test_bench_core_checks_verdicts_agree(tiny_size):
    shared_file("hellaswag_val.jsonl.gz")
    rows = bench.bench_core(tiny_size, repeats=1, device=torch.device("cpu"), n_items=4)
    assert [(r["method"], r["dtype"]) for r in rows] == [
        (method, d) for method in ("batched", "one-at-a-time") for d in bench.bench_dtypes()
    ]
    first = {r["method"]: r for r in rows if r["dtype"] == "fp32"}
    assert first["batched"]["same_verdicts"] == 1.0 == first["one-at-a-time"]["same_verdicts"]
    assert all(r["items"] == 12 for r in rows)


@pytest.mark.slow
def test_bench_prepare_compares_workers():
    shared_file("tinyshakespeare.txt")
    rows = bench.bench_prepare(repeats=1, copies=2, streamed=False)  # the report, not the speed
    assert rows[-1]["workers"] == 1 and rows[0]["tokens"] == rows[-1]["tokens"] > 0


@pytest.mark.slow
def test_bench_prepare_streams_the_same_documents_from_a_local_hub(tmp_path):
    import json

    from gpt2repro.bench.hubserver import bench_streamed_prepare
    from gpt2repro.data.prepare import prepare

    docs = shared_file("tinyshakespeare.txt").read_text().split("\n\n")[:200]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    tokens = prepare([str(tmp_path / "docs.jsonl")], tmp_path / "local", val_tokens=0, progress=False)[
        "total_tokens"
    ]
    rows = bench_streamed_prepare(docs, repeats=1, warmup=False)
    assert [r["faults"] for r in rows][0] == "none" and "1 in 3" in rows[1]["faults"]
    assert all(
        r["tokens"] == tokens and r["tok_per_s"] > 0 for r in rows
    )  # the same documents through the hub


@pytest.mark.slow
def test_bench_prepare_without_a_mirror_uses_tiny_shakespeare(monkeypatch):
    from gpt2repro.files import assets

    path = shared_file("tinyshakespeare.txt")
    monkeypatch.setattr(assets, "mirror_dir", lambda: None)
    monkeypatch.setattr(assets, "fetch", lambda name: path if name == "tinyshakespeare.txt" else None)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = bench.bench_prepare(repeats=1, copies=2, streamed=False)
    assert rows[0]["documents"] == 2 * len(lines) and rows[0]["tokens"] > 0


@pytest.mark.slow
def test_demo_script_end_to_end(tmp_path):
    shared_file("tinyshakespeare.txt")
    shared_file("hellaswag_val.jsonl.gz")
    cmd = [
        sys.executable,
        "scripts/demo.py",
        "--out",
        str(tmp_path),
        "--seconds",
        "600",
        "max_steps=3",
        "hellaswag_limit=8",
        "val_steps=1",
        "val_every=2",
        "hellaswag_every=2",
        "sample_every=2",
        "compile=false",
        "model.n_layer=2",
        "model.n_embd=64",
        "model.n_head=2",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for what in ("prepare", "train", "plot", "export", "done"):
        assert what in result.stdout
    assert (tmp_path / "run" / "curves.png").is_file()
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert "Hello, I'm a language model," in (tmp_path / "run" / "samples.txt").read_text()
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())  # the schedule fits the budget
    assert cfg["schedule_clock"] == "time" and cfg["time_budget"] == 0.7 * 600 and cfg["time_limit"] == 0
    assert "last LR" in result.stdout
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)  # a finished demo
    assert again.returncode == 0 and "already complete" in again.stdout
    summary = [line for line in result.stdout.splitlines() if "last val loss" in line]
    assert summary and "nan" not in summary[0]
    assert summary == [line for line in again.stdout.splitlines() if "last val loss" in line]


@pytest.mark.slow
def test_bench_memory_shows_activation_checkpointing_saving_memory():
    """Each mode in a fresh process, at a size where activations dominate a step (not the fused
    loss's buffers, as at 4x256): the tensors kept for backward, counted exactly; the step's RSS is
    reported beside them."""
    rows = bench.run("memory", size="12x256", repeats=1)["results"]
    assert [r["activation_checkpointing"] for r in rows] == ["none", "full"]
    assert all(
        r["step_extra_mb"] > 0 and r["peak_mb"] >= r["step_extra_mb"] and r["step_s"] > 0 for r in rows
    )
    none, full = rows
    assert full["saved_mb"] < 0.35 * none["saved_mb"] and none["saved_mb"] > 500


@pytest.mark.slow
def test_demo_script_trains_the_preset_it_is_given(tmp_path):
    shared_file("tinyshakespeare.txt")
    small = ["max_steps=1", "val_steps=1", "hellaswag_every=0", "sample_every=0", "compile=false"]
    small += ["model.n_layer=2", "model.n_embd=64", "model.n_head=2"]
    cmd = [sys.executable, "scripts/demo.py", "--out", str(tmp_path), "--preset", "cpu-demo-muon", *small]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "train: cpu-demo-muon preset" in result.stdout
    assert json.loads((tmp_path / "run" / "config.json").read_text())["optimizer"] == "muon"


def _demo_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


def test_demo_sizes_its_schedule_to_the_budget_on_this_host(tmp_path, monkeypatch):
    """A slow host gets fewer steps, so warmup and the whole decay finish before the time limit; a
    resumed demo keeps the schedule it started with; a fast host keeps the preset's steps."""
    from gpt2repro.config.presets import train_config
    from gpt2repro.training.optim import lr_at

    demo = _demo_module()
    cfg = train_config("cpu-demo", ["model.n_layer=1", "model.n_embd=64", "model.n_head=1"])
    assert 0 < demo.step_seconds(cfg) < 60  # really timed on this machine
    monkeypatch.setattr(demo, "step_seconds", lambda cfg: 2.0)  # an AVX2 host at ~2,000 tok/s
    steps = demo.schedule_steps(cfg, tmp_path / "run", seconds=480)
    assert steps == int(0.7 * 480 / 2.0) < cfg.max_steps and steps * 2.0 <= 480
    fitted = train_config("cpu-demo", demo.scaled_to(steps))
    assert lr_at(steps - 1, fitted) < 0.11 * fitted.max_lr  # the cosine has reached its floor by then
    assert fitted.warmup_steps == steps // 20 and fitted.val_every == steps // 10
    monkeypatch.setattr(demo, "step_seconds", lambda cfg: 0.01)
    assert demo.schedule_steps(cfg, tmp_path / "run", seconds=480) == cfg.max_steps
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(fitted.to_json())
    assert demo.schedule_steps(cfg, tmp_path / "run", seconds=480) == steps
