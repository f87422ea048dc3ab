"""Optimizer choices and schedules: Muon's parameter grouping and its update against a hand-written
Newton-Schulz step, the wsd schedule, target_val_loss, exact resume and DDP with Muon."""

import json
import math

import pytest
import torch
from helpers import SMALL, events, losses, run_to_end, small_cfg, stop_after, train_argv

from gpt2repro.checkpoint import ckptdir, gathered
from gpt2repro.config.presets import train_config
from gpt2repro.config.schema import MUON_LR_RATIO, ConfigError, model_config
from gpt2repro.model.gpt import GPT
from gpt2repro.training import train as tr
from gpt2repro.training.optim import HIDDEN_MATRICES, build_optimizer, lr_at, set_lr
from gpt2repro.training.plan import resolve


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


def _random_grads(muon: torch.optim.Optimizer) -> dict:
    grads = {p: torch.randn_like(p) for g in muon.param_groups for p in g["params"]}
    for p, g in grads.items():
        p.grad = g
    return grads


@pytest.mark.parametrize(
    ("name", "split"), [("mlp.c_fc.weight", 1), ("attn.c_attn.weight", 1), ("attn.c_attn.weight", 3)]
)
def test_muon_steps_are_orthogonalised_nesterov_momentum(name, split):
    """Two steps on one of the blocks' matrices against the update written out by hand (momentum,
    Nesterov, Newton-Schulz in float64 per block, the AdamW-RMS LR scale, decoupled weight decay)."""
    qkv = f"muon_split_qkv={split == 3}"
    cfg = muon_cfg("muon_weight_decay=0.1", "muon_momentum=0.9", "muon_ns_dtype=fp32", qkv)
    torch.manual_seed(0)
    model = GPT(model_config("tiny"))
    muon, adamw = build_optimizer(model, cfg, torch.device("cpu"))
    set_lr([muon, adamw], cfg.max_lr)
    w = model.transformer.h[1].get_parameter(name)
    rows = w.shape[0] // split
    lr, mu, scale = cfg.muon_lr, cfg.muon_momentum, 0.2 * math.sqrt(max(rows, w.shape[1]))
    start = w.detach().clone().double()
    expected, buf = start.clone(), torch.zeros_like(start)
    for _ in range(2):
        grads = _random_grads(muon)
        muon.step()
        g = grads[w].double()
        buf = mu * buf + (1 - mu) * g
        nesterov = g + mu * (buf - g)
        update = torch.cat([newton_schulz(b, torch.float64).double() for b in nesterov.split(rows)])
        expected = expected * (1 - lr * cfg.muon_weight_decay) - lr * scale * update
    # fp32 against float64: rounding only
    assert float((w.detach().double() - expected).norm() / (expected - start).norm()) < 1e-5
    for block in update.split(rows):
        singular = torch.linalg.svdvals(block)
        # orthogonalised: singular values near 1 (a square random block keeps a few tiny ones)
        assert 0.5 < singular.median() and singular.max() < 1.3


def test_muon_in_bf16_takes_torch_muons_steps_exactly():
    """With the bf16 iteration and c_attn whole, GPTMuon is torch.optim.Muon, bit for bit."""
    cfg = muon_cfg("muon_ns_dtype=bf16", "muon_weight_decay=0.1", "muon_split_qkv=false")
    torch.manual_seed(0)
    ours_model = GPT(model_config("tiny"))
    theirs_model = GPT(model_config("tiny"))
    theirs_model.load_state_dict(ours_model.state_dict())
    ours = build_optimizer(ours_model, cfg, torch.device("cpu"))[0]
    ours_params = [p for g in ours.param_groups for p in g["params"]]
    names = {p: n for n, p in ours_model.named_parameters()}
    theirs_params = [theirs_model.get_parameter(names[p]) for p in ours_params]
    theirs = torch.optim.Muon(
        theirs_params, lr=0.02, weight_decay=0.1, momentum=cfg.muon_momentum, adjust_lr_fn="match_rms_adamw"
    )
    set_lr([ours], cfg.max_lr)
    for _ in range(3):
        grads = _random_grads(ours)
        for p, q in zip(theirs_params, ours_params):
            p.grad = grads[q].clone()
        ours.step()
        theirs.step()
    for name, p in theirs_model.named_parameters():
        assert torch.equal(p, ours_model.get_parameter(name)), name


def test_wsd_schedule_holds_then_decays():
    cfg = train_config(
        "cpu-tiny", ["schedule=wsd", "max_steps=100", "warmup_steps=10", "wsd_decay_fraction=0.2"]
    )
    peak, low = cfg.max_lr, cfg.max_lr * cfg.min_lr_ratio
    assert lr_at(0, cfg) == pytest.approx(peak / 10) and lr_at(9, cfg) == pytest.approx(peak)
    assert lr_at(10, cfg) == lr_at(79, cfg) == lr_at(80, cfg) == peak  # stable until the last 20 steps
    assert lr_at(90, cfg) == pytest.approx(low + (peak - low) * 10 / 20)
    assert lr_at(99, cfg) == pytest.approx(low + (peak - low) / 20) and lr_at(100, cfg) == low


def test_target_val_loss_stops_and_logs(data_dir, tmp_path):
    cfg = small_cfg("max_steps=50", "val_every=2", "val_steps=1", "target_val_loss=10.5")
    summary = tr.train(cfg, data_dir, tmp_path)
    (target,) = events(tmp_path, "target")
    assert target["val_loss"] <= 10.5 and target["tokens"] == target["step"] * 256 and target["seconds"] > 0
    assert summary["step"] == target["step"] < 50  # stopped at the step it was found at, and saved it
    assert summary["val_loss"] == target["val_loss"]
    assert ckptdir.latest(tmp_path).name == f"step_{summary['step']:08d}"


@pytest.mark.slow
def test_muon_stop_and_resume_is_bit_identical(data_dir, tmp_path, monkeypatch):
    cfg = ["max_steps=6", "ckpt_every=100", "shuffle=true"]
    tr.train(muon_cfg(*cfg), data_dir, tmp_path / "straight")
    stop_after(monkeypatch, 3)
    tr.train(muon_cfg(*cfg), data_dir, tmp_path / "resumed")
    monkeypatch.undo()
    tr.train(muon_cfg(*cfg), data_dir, tmp_path / "resumed")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert sorted(losses(tmp_path / "straight")) == list(range(6))


@pytest.mark.slow
def test_muon_under_ddp_equals_one_process(data_dir, tmp_path):
    base = train_argv(data_dir, *SMALL, "optimizer=muon", "muon_lr=0.02")
    base += ["max_steps=3", "shuffle=true"]
    run_to_end([*base, "--out", str(tmp_path / "one")])
    run_to_end([*base, "--out", str(tmp_path / "two")], nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == [0, 1, 2]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4)  # bf16 Newton-Schulz, summation order


def test_tokens_to_reach_interpolates_the_validation_curve():
    from gpt2repro.bench.learn import tokens_to_reach

    curve = [(0, 10.0), (100, 6.0), (200, 4.0), (300, 3.5)]
    assert tokens_to_reach(curve, 5.0) == pytest.approx(150.0)
    assert tokens_to_reach(curve, 6.0) == 100.0 and tokens_to_reach(curve, 3.0) is None


@pytest.mark.slow
def test_bench_learn_sweeps_both_optimizers_and_plots(data_dir, tmp_path):
    from gpt2repro.bench.learn import LR_FACTORS, bench_learn

    small = [o for o in SMALL if not o.startswith(("max_lr", "warmup_steps", "val_every", "log_every"))]
    with pytest.raises(ConfigError, match="muon_ns_dtype='fp8'"):  # before any run
        bench_learn(
            ["cpu-tiny"], str(tmp_path / "none"), 4, 1, None, overrides=small, recipe=("muon_ns_dtype=fp8",)
        )
    (row,) = bench_learn(
        ["cpu-tiny"], str(data_dir), steps=4, seeds=1, plot=str(tmp_path / "l.png"), overrides=small
    )
    assert row["size"] == "cpu-tiny" and row["budget_tokens"] == 4 * 256
    assert row["adamw_lr"] in [3e-3 * f for f in LR_FACTORS] and row["muon_lr"] in [
        MUON_LR_RATIO * 3e-3 * f for f in LR_FACTORS
    ]
    assert row["adamw_step_s"] > 0 and row["muon_step_s"] > 0 and row["adamw_final_val"] < 11
    assert len(row["sweep"]["adamw"]) == len(row["sweep"]["muon"]) == len(LR_FACTORS)
    assert (
        row["sweep"]["adamw"][row["adamw_lr"]]
        == row["adamw_final_val"]
        == min(row["sweep"]["adamw"].values())
    )
    assert (tmp_path / "l.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_a_muon_trained_model_exports_to_transformers_with_equal_logits(data_dir, tmp_path):
    """Muon changes how the weights are found, not what they are: the export loads in transformers
    and gives our logits."""
    transformers = pytest.importorskip("transformers")
    from gpt2repro.interop.hf import export_hf

    tr.train(muon_cfg("max_steps=3", "ckpt_every=3"), data_dir, tmp_path / "run")
    model = gathered.load_model(tmp_path / "run").eval()
    out = export_hf(model, tmp_path / "hf")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    idx = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, model(idx)[0], rtol=0, atol=1e-5)
    ckpt = ckptdir.latest(tmp_path / "run")
    assert json.loads((ckpt / "config.json").read_text())["optimizer"] == "muon"


def test_muon_presets_are_the_originals_with_the_recipe():
    """gpt2-124m-muon: the 10B run with Muon in 0.7x its steps (the published 124M ratios), stopping
    at GPT-2 124M's val loss, nothing else changed; the recipe's LR follows the preset's AdamW LR
    (which follows width) unless muon_lr is set."""
    base, muon = train_config("gpt2-124m-10B").to_dict(), train_config("gpt2-124m-muon").to_dict()
    assert {k for k in base if base[k] != muon[k]} == {"optimizer", "max_steps", "target_val_loss"}
    assert muon["max_steps"] == 13352 and muon["target_val_loss"] == 3.29 and muon["val_every"] > 0
    assert train_config("gpt2-124m-muon").muon_peak_lr == MUON_LR_RATIO * 6e-4
    assert train_config("gpt3-large", ["optimizer=muon"]).muon_peak_lr == MUON_LR_RATIO * 2.5e-4
    assert train_config("gpt2-124m-muon", ["muon_lr=0.01"]).muon_peak_lr == 0.01
    demo, demo_muon = train_config("cpu-demo").to_dict(), train_config("cpu-demo-muon").to_dict()
    assert {k for k in demo if demo[k] != demo_muon[k]} >= {"optimizer", "max_steps"}
    assert demo_muon["model"] == demo["model"] and demo_muon["max_steps"] * 2 <= demo["max_steps"]


def test_a_forced_bf16_newton_schulz_warns_where_bf16_is_emulated(data_dir, tmp_path, capsys, monkeypatch):
    from gpt2repro.model import precision

    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    tr.train(muon_cfg("max_steps=1", "muon_ns_dtype=bf16"), data_dir, tmp_path / "bf16")
    assert "warning: muon_ns_dtype: bf16 on this CPU has no native matmul support" in capsys.readouterr().out
    tr.train(muon_cfg("max_steps=1"), data_dir, tmp_path / "auto")
    assert "warning" not in capsys.readouterr().out


@pytest.mark.slow
def test_a_resumed_run_takes_its_configs_hyperparameters_not_the_checkpoints(data_dir, tmp_path):
    """torch's load_state_dict restores the saved group values; a run resumed with other LRs,
    decays or betas must use the new ones, and may not switch optimizer under its saved state."""
    from gpt2repro.parallel.distributed import DistInfo

    tr.train(muon_cfg("max_steps=2", "ckpt_every=2", "muon_split_qkv=false"), data_dir, tmp_path)
    changed = [
        "muon_lr=0.01",
        "muon_weight_decay=0.05",
        "muon_split_qkv=true",
        "weight_decay=0.2",
        "beta2=0.99",
    ]
    cfg = muon_cfg("max_steps=4", *changed)
    trainer = tr.Trainer(resolve(cfg, DistInfo(0, 0, 1, torch.device("cpu"))), data_dir, tmp_path)
    assert trainer.resume() == 2
    muon, adamw = trainer.optimizers
    assert [g["split"] for g in muon.param_groups] == [3, 1] and len(muon.state) == 8  # buffers restored
    assert all(g["lr_scale"] == 0.01 / cfg.max_lr and g["weight_decay"] == 0.05 for g in muon.param_groups)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.2, 0.0]
    assert adamw.param_groups[0]["betas"] == (0.9, 0.99)
    with pytest.raises(tr.TrainingError, match="config differs in optimizer"):
        tr.train(small_cfg("max_steps=4"), data_dir, tmp_path)
