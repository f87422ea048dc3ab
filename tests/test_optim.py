"""Optimizer choices and schedules: Muon's parameter grouping and its update against a hand-written
Newton-Schulz step, the wsd schedule, target_val_loss, exact resume and DDP with Muon."""

import math

import pytest
import torch

from gpt2repro import checkpoint
from gpt2repro import train as tr
from gpt2repro.config import ConfigError, model_config, train_config
from gpt2repro.model import GPT
from gpt2repro.optim import HIDDEN_MATRICES, build_optimizer, lr_at, set_lr
from test_train import SMALL, _run_to_end, _stop_after, events, losses, small_cfg, train_argv


def muon_cfg(*extra):
    return small_cfg("optimizer=muon", "muon_lr=0.02", *extra)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = GPT(model_config("tiny"))
    muon, adamw = build_optimizer(model, muon_cfg(), torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert in_muon == {f"transformer.h.{i}.{m}" for i in range(2) for m in HIDDEN_MATRICES}
    assert in_muon | in_adamw == set(names.values()) and not in_muon & in_adamw
    assert "transformer.wte.weight" in in_adamw and "transformer.h.0.ln_1.weight" in in_adamw
    set_lr([muon, adamw], 1e-3)
    assert muon.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.02 / muon_cfg().max_lr)
    assert adamw.param_groups[0]["lr"] == 1e-3


def newton_schulz(g: torch.Tensor, dtype: torch.dtype, steps: int = 5) -> torch.Tensor:
    """The quintic iteration of Keller Jordan's Muon, written out, computed in `dtype`."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).float()


def test_muon_steps_are_orthogonalised_nesterov_momentum():
    """Two steps on one of the blocks' matrices against the update written out by hand (momentum,
    Nesterov, Newton-Schulz in float64, the AdamW-RMS LR scale, decoupled weight decay)."""
    cfg = muon_cfg("muon_weight_decay=0.1", "muon_momentum=0.9")
    torch.manual_seed(0)
    model = GPT(model_config("tiny"))
    muon, adamw = build_optimizer(model, cfg, torch.device("cpu"))
    set_lr([muon, adamw], cfg.max_lr)
    w = model.transformer.h[1].mlp.c_fc.weight
    lr, mu, scale = cfg.muon_lr, cfg.muon_momentum, 0.2 * math.sqrt(max(w.shape))
    start = w.detach().clone().double()
    expected, buf = start.clone(), torch.zeros_like(start)
    for _ in range(2):
        grads = {p: torch.randn_like(p) for g in muon.param_groups for p in g["params"]}
        for p, g in grads.items():
            p.grad = g
        muon.step()
        g = grads[w].double()
        buf = mu * buf + (1 - mu) * g
        update = newton_schulz(g + mu * (buf - g), torch.float64).double()
        expected = expected * (1 - lr * cfg.muon_weight_decay) - lr * scale * update
    # torch's Muon iterates in bf16; the float64 iteration agrees to that precision
    assert float((w.detach().double() - expected).norm() / (expected - start).norm()) < 0.05
    singular = torch.linalg.svdvals(update)
    assert 0.3 < singular.min() and singular.max() < 1.3  # orthogonalised: singular values near 1


def test_wsd_schedule_holds_then_decays():
    cfg = train_config(
        "cpu-tiny", ["schedule=wsd", "max_steps=100", "warmup_steps=10", "wsd_decay_fraction=0.2"]
    )
    peak, low = cfg.max_lr, cfg.max_lr * cfg.min_lr_ratio
    assert lr_at(0, cfg) == pytest.approx(peak / 10) and lr_at(9, cfg) == pytest.approx(peak)
    assert lr_at(10, cfg) == lr_at(79, cfg) == lr_at(80, cfg) == peak  # stable until the last 20 steps
    assert lr_at(90, cfg) == pytest.approx(low + (peak - low) * 10 / 20)
    assert lr_at(99, cfg) == pytest.approx(low + (peak - low) / 20) and lr_at(100, cfg) == low


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optimizer=sgd"], "optimizer='sgd' is not one of adamw, muon"),
        (["optimizer=muon", "fsdp=true"], "optimizer=muon with fsdp=true is not supported"),
        (["schedule=wsd", "wsd_decay_fraction=0"], "wsd_decay_fraction=0.0: expected a number in \\(0, 1\\]"),
        (["target_val_loss=3", "val_every=0"], "target_val_loss needs validation"),
        (["muon_lr=-1"], "muon_lr=-1.0: expected a positive number"),
    ],
)
def test_bad_optimizer_settings(overrides, message):
    with pytest.raises(ConfigError, match=message):
        train_config("cpu-tiny", overrides)


def test_target_val_loss_stops_and_logs(data_dir, tmp_path):
    cfg = small_cfg("max_steps=50", "val_every=2", "val_steps=1", "target_val_loss=10.5")
    summary = tr.train(cfg, data_dir, tmp_path)
    (target,) = events(tmp_path, "target")
    assert target["val_loss"] <= 10.5 and target["tokens"] == target["step"] * 256 and target["seconds"] > 0
    assert summary["step"] == target["step"] + 1 < 50  # stopped after the step it was found at
    assert checkpoint.latest(tmp_path).name == f"step_{summary['step']:08d}"


def test_muon_stop_and_resume_is_bit_identical(data_dir, tmp_path, monkeypatch):
    cfg = ["max_steps=6", "ckpt_every=100", "shuffle=true"]
    tr.train(muon_cfg(*cfg), data_dir, tmp_path / "straight")
    _stop_after(monkeypatch, 3)
    tr.train(muon_cfg(*cfg), data_dir, tmp_path / "resumed")
    monkeypatch.undo()
    tr.train(muon_cfg(*cfg), data_dir, tmp_path / "resumed")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert sorted(losses(tmp_path / "straight")) == list(range(6))


def test_muon_under_ddp_equals_one_process(data_dir, tmp_path):
    base = train_argv(data_dir, *SMALL, "optimizer=muon", "muon_lr=0.02")
    base += ["max_steps=3", "shuffle=true"]
    _run_to_end([*base, "--out", str(tmp_path / "one")])
    _run_to_end([*base, "--out", str(tmp_path / "two")], nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == [0, 1, 2]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4)  # bf16 Newton-Schulz, summation order


def test_tokens_to_reach_interpolates_the_validation_curve():
    from gpt2repro.bench.learn import tokens_to_reach

    curve = [(0, 10.0), (100, 6.0), (200, 4.0), (300, 3.5)]
    assert tokens_to_reach(curve, 5.0) == pytest.approx(150.0)
    assert tokens_to_reach(curve, 6.0) == 100.0 and tokens_to_reach(curve, 3.0) is None


def test_bench_learn_sweeps_both_optimizers_and_plots(data_dir, tmp_path):
    from gpt2repro.bench.learn import LR_FACTORS, bench_learn

    small = [o for o in SMALL if not o.startswith(("max_lr", "warmup_steps", "val_every", "log_every"))]
    (row,) = bench_learn(
        ["cpu-tiny"], str(data_dir), steps=4, seeds=1, plot=str(tmp_path / "l.png"), overrides=small
    )
    assert row["size"] == "cpu-tiny" and row["budget_tokens"] == 4 * 256
    assert row["adamw_lr"] in [3e-3 * f for f in LR_FACTORS] and row["muon_lr"] in [
        3e-3 * f for f in LR_FACTORS
    ]
    assert row["adamw_step_s"] > 0 and row["muon_step_s"] > 0 and row["adamw_final_val"] < 11
    assert (tmp_path / "l.png").read_bytes()[:4] == b"\x89PNG"
