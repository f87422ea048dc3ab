"""The training loop on CPU: learning, accumulation, DDP/FSDP equivalence, exact resume, guards."""

import dataclasses
import json
import math
import shutil
import signal

import pytest
import torch
from helpers import (
    SMALL,
    as_written_before_components_saved_themselves,
    events,
    free_port,
    launch,
    losses,
    run_to_end,
    small_cfg,
    stop_after,
    train_argv,
)

from gpt2repro.checkpoint import ckptdir, gathered
from gpt2repro.config.overrides import apply_overrides
from gpt2repro.config.presets import train_config
from gpt2repro.config.schema import ConfigError
from gpt2repro.data.shards import ShardError
from gpt2repro.files.fsio import WriteError
from gpt2repro.model.gpt import GPT
from gpt2repro.parallel.distributed import DistInfo
from gpt2repro.training import train as tr
from gpt2repro.training.plan import grad_accum_steps, resolve


@pytest.mark.slow
def test_loss_falls_well_below_its_start(data_dir, tmp_path):
    summary = tr.train(small_cfg("max_steps=60", "val_every=30", "val_steps=2"), data_dir, tmp_path)
    seen = losses(tmp_path)
    assert seen[0] > 10.5 and summary["loss"] < 7.0 and summary["val_loss"] < 7.5
    assert json.loads((tmp_path / "config.json").read_text())["max_steps"] == 60


@pytest.mark.slow
@pytest.mark.parametrize("limit", ["max_steps=4", "time_limit=0.001"])
def test_the_final_evaluation_is_of_the_saved_weights(data_dir, tmp_path, limit):
    """Both ways a run ends report the val loss of the weights in the checkpoint they save."""
    from gpt2repro.data.loader import DataLoader

    summary = tr.train(small_cfg("max_steps=4", "val_every=3", "val_steps=2", limit), data_dir, tmp_path)
    final = ckptdir.latest(tmp_path)
    assert (
        final.name == f"step_{summary['step']:08d}" and events(tmp_path, "val")[-1]["step"] == summary["step"]
    )
    model = gathered.load_model(tmp_path).eval()
    loader = DataLoader(data_dir, "val", 4, 32)
    with torch.no_grad():
        fresh = sum(model(*loader.next_batch())[1].item() for _ in range(2)) / 2
    assert summary["val_loss"] == pytest.approx(fresh, rel=1e-6)


def test_the_plan_resolves_the_config_once_for_ranks_and_device():
    cfg = small_cfg("dtype=auto")
    given = cfg.to_json()
    one = resolve(cfg, DistInfo(0, 0, 1, torch.device("cpu")))
    two = resolve(cfg, DistInfo(0, 0, 2, torch.device("cpu")))
    assert (one.accum, two.accum, one.step_windows, two.step_windows) == (2, 1, 2, 2)
    assert one.dtype in ("fp32", "bf16") and one.compile is False  # (the CPU presets do not compile)
    assert one.cfg is not cfg and cfg.to_json() == given
    with pytest.raises(dataclasses.FrozenInstanceError):
        one.accum = 3
    with pytest.raises(ConfigError, match="nearest valid"):
        resolve(cfg, DistInfo(0, 0, 3, torch.device("cpu")))


def test_gradient_accumulation_equals_one_big_batch(data_dir, tmp_path):
    cfg = small_cfg()
    trainer = tr.Trainer(resolve(cfg, DistInfo(0, 0, 1, torch.device("cpu"))), data_dir, tmp_path)
    assert trainer.plan.accum == 2
    batches = [trainer.train_loader.next_batch() for _ in range(2)]
    trainer.train_loader.reset()
    loss = trainer.forward_backward()
    model = trainer.raw
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    _, big = model(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    big.backward()
    assert loss == pytest.approx(big.item(), rel=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(accumulated[n], p.grad, rtol=1e-5, atol=1e-7)


def test_presets_resolve_the_original_accumulation():
    cfg = train_config("gpt2-124m-10B")
    assert (cfg.total_batch_size, cfg.micro_batch_size, cfg.seq_len, cfg.max_steps, cfg.warmup_steps) == (
        524288,
        64,
        1024,
        19073,
        715,
    )
    assert cfg.model.padded_vocab_size == 50304 and cfg.max_lr == 6e-4 and cfg.min_lr_ratio == 0.1
    assert grad_accum_steps(cfg, 1) == 8 and grad_accum_steps(cfg, 8) == 1
    assert train_config("gpt2-124m-40B").max_steps == 76292 and train_config("gpt2-124m-40B").shuffle
    xl = train_config("gpt3-xl")
    assert (xl.model.n_layer, xl.model.n_embd, xl.model.n_head, xl.total_batch_size, xl.max_lr) == (
        24,
        2048,
        16,
        1048576,
        2e-4,
    )
    assert xl.warmup_steps * xl.total_batch_size >= 375e6 and xl.seq_len == 2048 and xl.fsdp


def test_lr_schedule():
    from gpt2repro.training.optim import lr_at

    cfg = train_config("gpt2-124m-10B")
    assert lr_at(0, cfg) == pytest.approx(6e-4 / 715)
    assert lr_at(714, cfg) == pytest.approx(6e-4)
    assert lr_at(19072, cfg) == pytest.approx(6e-5, rel=1e-3)
    assert lr_at(30000, cfg) == pytest.approx(6e-5)


def test_weight_decay_groups():
    from gpt2repro.training.optim import build_optimizer

    cfg = small_cfg()
    model = GPT(cfg.model)
    (adamw,) = build_optimizer(model, cfg, torch.device("cpu"))
    decay, no_decay = adamw.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_unknown_preset_and_indivisible_batch():
    with pytest.raises(ConfigError, match="unknown training preset 'gpt5'; choose one of: gpt2-124m-10B"):
        train_config("gpt5")
    cfg = apply_overrides(train_config("gpt2-124m-10B"), ["total_batch_size=500000"])
    with pytest.raises(ConfigError, match="nearest valid: 458752 or 524288"):
        grad_accum_steps(cfg, 1)


@pytest.mark.slow
def test_stop_and_resume_is_bit_identical(data_dir, tmp_path, monkeypatch):
    cfg = ["max_steps=8", "ckpt_every=100", "shuffle=true", "val_every=3", "val_steps=2"]
    tr.train(small_cfg(*cfg), data_dir, tmp_path / "straight")
    stop_after(monkeypatch, 4)
    tr.train(small_cfg(*cfg), data_dir, tmp_path / "resumed")
    assert ckptdir.latest(tmp_path / "resumed").name == "step_00000004"
    assert max(losses(tmp_path / "resumed")) == 3
    monkeypatch.undo()
    tr.train(small_cfg(*cfg), data_dir, tmp_path / "resumed")
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(8))
    assert resumed == straight  # exactly equal floats


@pytest.mark.slow
def test_crash_then_resume_from_last_checkpoint(data_dir, tmp_path, monkeypatch):
    cfg = ["max_steps=6", "ckpt_every=2", "keep_last=2"]
    tr.train(small_cfg(*cfg), data_dir, tmp_path / "straight")
    real, calls = tr.Trainer.forward_backward, {"n": 0}

    def dying(self):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("node lost")
        return real(self)

    monkeypatch.setattr(tr.Trainer, "forward_backward", dying)
    with pytest.raises(RuntimeError, match="node lost"):
        tr.train(small_cfg(*cfg), data_dir, tmp_path / "crashed")
    monkeypatch.undo()
    ckpts = sorted(p.name for p in (tmp_path / "crashed" / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000002", "step_00000004"]  # keep_last=2
    tr.train(small_cfg(*cfg), data_dir, tmp_path / "crashed")
    assert losses(tmp_path / "crashed") == losses(tmp_path / "straight")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    real, calls = tr.Trainer.forward_backward, {"n": 0}

    def poisoned(self):
        calls["n"] += 1
        return float("nan") if calls["n"] == 4 else real(self)

    monkeypatch.setattr(tr.Trainer, "forward_backward", poisoned)
    with pytest.raises(tr.TrainingError, match="loss is nan at step 3; stopping .*step_00000002"):
        tr.train(small_cfg("max_steps=6", "ckpt_every=2"), data_dir, tmp_path)
    good = ckptdir.latest(tmp_path)
    assert good.name == "step_00000002"
    assert all(torch.isfinite(p).all() for p in gathered.load_model(tmp_path).parameters())


def test_failed_checkpoint_write_leaves_the_previous_one(data_dir, tmp_path, monkeypatch):
    tr.train(small_cfg("max_steps=2", "ckpt_every=2"), data_dir, tmp_path)
    before = gathered.load_model(tmp_path).state_dict()
    real_save = torch.save

    def disk_full(obj, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gathered.torch, "save", disk_full)
    with pytest.raises(
        WriteError,
        match=r"step_00000004: cannot write checkpoint step 4: no space left on device \(.* free, at least "
        r".* needed\); last good checkpoint: step_00000002$",
    ):
        tr.train(small_cfg("max_steps=4", "ckpt_every=2"), data_dir, tmp_path)
    monkeypatch.setattr(gathered.torch, "save", real_save)
    assert ckptdir.latest(tmp_path).name == "step_00000002"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == []
    after = gathered.load_model(tmp_path).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_incompatible_resume_is_refused(data_dir, tmp_path):
    tr.train(small_cfg("max_steps=2"), data_dir, tmp_path)
    with pytest.raises(tr.TrainingError, match="config differs in total_batch_size"):
        tr.train(small_cfg("max_steps=4", "total_batch_size=128"), data_dir, tmp_path)
    with pytest.raises(tr.TrainingError, match="no checkpoint to resume from"):
        tr.train(small_cfg("max_steps=4", "resume=require"), data_dir, tmp_path / "fresh")
    tr.train(small_cfg("max_steps=4", "resume=never"), data_dir, tmp_path / "fresh")
    assert sorted(losses(tmp_path / "fresh")) == [0, 1, 2, 3]
    other = tmp_path / "other-data"
    shutil.copytree(data_dir, other)
    (other / "train_000008.bin").unlink()
    with pytest.raises(tr.TrainingError, match="cannot resume .*loader state has shards="):
        tr.train(small_cfg("max_steps=4"), other, tmp_path)


@pytest.mark.slow
def test_a_fresh_run_never_shadows_an_earlier_one(data_dir, tmp_path):
    tr.train(small_cfg("max_steps=4", "ckpt_every=1"), data_dir, tmp_path)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(
        tr.TrainingError, match="holds checkpoints of an earlier run .step_00000004.*overwrite=true"
    ):
        tr.train(small_cfg("max_steps=2", "resume=never"), data_dir, tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    tr.train(small_cfg("max_steps=2", "resume=never", "overwrite=true"), data_dir, tmp_path)
    assert ckptdir.latest(tmp_path).name == "step_00000002"
    assert [p.name for p in ckptdir.all_steps(tmp_path)] == ["step_00000002"]
    assert sorted(losses(tmp_path)) == [0, 1]  # the old run's metrics went with its checkpoints


def test_corrupted_checkpoint_is_named(data_dir, tmp_path):
    tr.train(small_cfg("max_steps=1"), data_dir, tmp_path)
    (ckptdir.latest(tmp_path) / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ckptdir.CheckpointError, match="model.safetensors: sha256 mismatch"):
        gathered.load_model(tmp_path)
    with pytest.raises(ckptdir.CheckpointError, match="not a checkpoint"):
        gathered.load_model(tmp_path / "nowhere")


@pytest.mark.slow
def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(data_dir, tmp_path, capsys):
    cfg = ["max_steps=6", "ckpt_every=1", "keep_last=3", "shuffle=true"]
    tr.train(small_cfg(*cfg), data_dir, tmp_path / "straight")
    run = tmp_path / "run"
    tr.train(small_cfg(*cfg[1:], "max_steps=4"), data_dir, run)
    weights = ckptdir.step_dir(run, 4) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # one flipped bit pattern in the tensor data: loads fine, but wrong
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    tr.train(small_cfg(*cfg), data_dir, run)
    out = capsys.readouterr().out
    assert "step_00000004/model.safetensors: sha256 mismatch" in out and "using step_00000003 instead" in out
    assert "resumed from step_00000003" in out
    assert losses(run) == losses(tmp_path / "straight")
    (run / "checkpoints" / "latest").unlink()  # a missing pointer: the newest that verifies
    assert ckptdir.latest(run).name == "step_00000006"
    (run / "checkpoints" / "latest").write_text("../../elsewhere\n")
    with pytest.raises(
        ckptdir.CheckpointError, match="names '../../elsewhere', not a step_NNNNNNNN directory"
    ):
        ckptdir.latest(run)


def test_diverged_weights_are_never_called_good(data_dir, tmp_path, monkeypatch):
    with pytest.raises(tr.TrainingError, match="diverged_step_00000001 .last good checkpoint: none"):
        tr.train(small_cfg("max_lr=1e9", "ckpt_every=1", "max_steps=6"), data_dir, tmp_path / "blowup")
    assert ckptdir.latest(tmp_path / "blowup") is None
    assert (tmp_path / "blowup" / "checkpoints" / "diverged_step_00000001").is_dir()  # kept, never resumed
    real, calls = tr.Trainer.forward_backward, {"n": 0}

    def poisoned(self):
        calls["n"] += 1
        return 1e6 if calls["n"] == 4 else real(self)  # finite, but far past any real loss

    monkeypatch.setattr(tr.Trainer, "forward_backward", poisoned)
    with pytest.raises(
        tr.TrainingError, match="loss is 1000000.0 at step 3.*last good checkpoint: .*step_00000002"
    ):
        tr.train(small_cfg("ckpt_every=1", "max_steps=6"), data_dir, tmp_path / "late")
    assert ckptdir.latest(tmp_path / "late").name == "step_00000002"


def test_verify_data_checks_the_shards_against_the_manifest(data_dir, tmp_path):
    tr.train(small_cfg("max_steps=1", "verify_data=true"), data_dir, tmp_path / "ok")
    bad = tmp_path / "bad-data"
    shutil.copytree(data_dir, bad)
    shard = bad / "train_000003.bin"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="train_000003.bin: sha256 mismatch"):
        tr.train(small_cfg("max_steps=1", "verify_data=true"), bad, tmp_path / "bad")
    assert not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.slow
def test_sigterm_checkpoints_and_resumes(data_dir, tmp_path):
    args = [*train_argv(data_dir, "--out", tmp_path), *SMALL, "max_steps=400", "log_every=1"]
    proc = launch(*args)
    for line in proc.stdout:
        if line.startswith("step      2"):
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert "stopping at step" in out and "(signal)" in out
    done = json.loads((ckptdir.latest(tmp_path) / "state.json").read_text())["step"]
    assert 3 <= done < 400
    proc = launch(*args[:-2], "max_steps=" + str(done + 2), "--resume")
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and f"resumed from step_{done:08d}" in out, out
    assert sorted(losses(tmp_path))[-1] == done + 1


def _gloo_common(data_dir) -> list[str]:
    return [
        *train_argv(data_dir, *SMALL),
        "max_steps=4",
        "shuffle=true",
        "val_every=3",
        "val_steps=2",
        "hellaswag_every=3",
        "hellaswag_limit=7",  # odd: the ranks get different numbers of examples
    ]


@pytest.fixture(scope="module")
def one_process_run(data_dir, tmp_path_factory):
    """The one-process run both two-process modes are compared with."""
    out = tmp_path_factory.mktemp("one")
    run_to_end([*_gloo_common(data_dir), "--out", str(out)])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_gloo_matches_one_process(data_dir, tmp_path, mode, one_process_run):
    common, one_run = _gloo_common(data_dir), one_process_run
    # with activation checkpointing too: it may not change the losses
    extra = {
        "ddp": ["fsdp=false", "activation_checkpointing=every_2"],
        "fsdp": ["fsdp=true", "activation_checkpointing=full"],
    }
    run_to_end([*common, "--out", str(tmp_path / "two"), *extra[mode]], nproc=2)
    one, two = losses(one_run), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [0, 1, 2, 3]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5)
    hs_one, hs_two = (events(run, "hellaswag") for run in (one_run, tmp_path / "two"))
    assert [r["n"] for r in hs_two] == [7, 7, 7] and [r["acc_norm"] for r in hs_two] == [
        r["acc_norm"] for r in hs_one
    ]
    # the 2-rank checkpoint (under FSDP a shard per rank) loads whole in one process
    a = gathered.load_model(one_run).state_dict()
    b = gathered.load_model(tmp_path / "two").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_compiled_training_with_val_hellaswag_and_sampling(data_dir, tmp_path, enc, optimizer):
    from conftest import shared_file

    shared_file("hellaswag_val.jsonl.gz")
    summary = tr.train(
        small_cfg(
            f"optimizer={optimizer}",
            "max_steps=3",
            "compile=true",
            "dtype=bf16",
            "activation_checkpointing=every_1",
            "val_every=2",
            "val_steps=2",
            "hellaswag_every=2",
            "hellaswag_limit=8",
            "sample_every=2",
            "sample_count=2",
            "sample_tokens=8",
        ),
        data_dir,
        tmp_path,
    )
    events = [json.loads(line)["event"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "val", "hellaswag", "sample"} <= set(events)
    assert summary["step"] == 3 and "val_loss" in summary and "hellaswag_acc_norm" in summary
    assert "Hello, I'm a language model," in (tmp_path / "samples.txt").read_text()
    assert all(math.isfinite(loss) for loss in losses(tmp_path).values())


@pytest.mark.slow
def test_plot_writes_a_png(data_dir, tmp_path):
    pytest.importorskip("matplotlib")
    from gpt2repro.training.plot import plot_run

    tr.train(small_cfg("max_steps=3", "val_every=1", "val_steps=1"), data_dir, tmp_path)
    out = plot_run(tmp_path)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_the_fineweb_val_loss_is_drawn_only_beside_fineweb_runs(run_dir):
    """GPT-2's 3.29 is a FineWeb-EDU val loss: a Tiny Shakespeare run gets no such line."""
    from gpt2repro.training.plot import GPT2_124M_VAL_LOSS, loss_references, read_metrics

    events = read_metrics(run_dir)
    assert any("tinyshakespeare" in s for s in events["data"][0]["sources"])
    assert loss_references(events) == []
    for source in ("hf-shards:kjj0/finewebedu10B-gpt2", "HuggingFaceFW/fineweb-edu"):
        lines = loss_references({"data": [{"step": 0, "sources": [source]}]})
        assert [v for v, _ in lines] == [GPT2_124M_VAL_LOSS] and "FineWeb-EDU" in lines[0][1]


def test_tensorboard_without_the_package_is_a_clear_error(data_dir, tmp_path):
    try:
        import tensorboard  # noqa: F401

        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match="tensorboard=true needs the tensorboard package"):
        tr.train(small_cfg("max_steps=1", "tensorboard=true"), data_dir, tmp_path)


CONSTANT_LR = ["min_lr_ratio=1", "shuffle=true", "ckpt_every=2"]  # the LR does not depend on max_steps


@pytest.mark.slow
def test_resume_on_another_number_of_ranks_continues_the_same_stream(data_dir, tmp_path):
    """2 ranks -> 1 rank -> 2 ranks takes the same windows, so the same losses, as one process."""
    base = train_argv(data_dir, *SMALL, *CONSTANT_LR)
    run_to_end([*base, "--out", str(tmp_path / "straight"), "max_steps=6"])
    elastic = ["--out", str(tmp_path / "elastic")]
    run_to_end([*base, *elastic, "max_steps=2"], nproc=2)
    out = run_to_end([*base, *elastic, "max_steps=4"])
    assert (
        "x1 | dtype fp32 | tf32 off | compile False | grad_accum 2 | steps 2..4 | resumed from step_00000002"
        in out
    )
    out = run_to_end([*base, *elastic, "max_steps=6"], nproc=2)
    assert (
        "x2 | dtype fp32 | tf32 off | compile False | grad_accum 1 | steps 4..6 | resumed from step_00000004"
        in out
    )
    straight, elastic_losses = losses(tmp_path / "straight"), losses(tmp_path / "elastic")
    assert sorted(elastic_losses) == list(range(6))
    for step, loss in straight.items():
        assert elastic_losses[step] == pytest.approx(loss, rel=1e-5)  # summation order differs across ranks


@pytest.mark.slow
def test_two_node_launch_on_one_machine_matches_one_process(data_dir, tmp_path):
    """torchrun --nnodes 2 with c10d rendezvous on 127.0.0.1, one process per "node", gloo."""
    base = train_argv(data_dir, *SMALL, "max_steps=3", "shuffle=true")
    run_to_end([*base, "--out", str(tmp_path / "one")])
    rdzv = ["--nnodes", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}"]
    rdzv += ["--rdzv_id", "gpt2repro-test"]
    nodes = [
        launch(*base, "--out", str(tmp_path / "two"), nproc=1, launcher=[*rdzv, "--node_rank", str(rank)])
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == [0, 1, 2] and "x2 |" in outputs[0]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5)


def _as_written_before_compile_was_a_bool(run, value: str) -> None:
    """Rewrite a run as the code before this change wrote it: "compile" a string in its config.json
    and its checkpoints' (their sha256s and manifests as that code recorded them)."""
    from gpt2repro.files.fsio import sha256_file

    for path in [run / "config.json", *(d / "config.json" for d in ckptdir.all_steps(run))]:
        saved = json.loads(path.read_text())
        path.write_text(json.dumps({**saved, "compile": value}, indent=2, sort_keys=True))
    for ckpt in ckptdir.all_steps(run):
        state = json.loads((ckpt / "state.json").read_text())
        state["sha256"]["config.json"] = sha256_file(ckpt / "config.json")
        (ckpt / "state.json").write_text(json.dumps(state))
        ckptdir.write_manifest(ckpt, {**state["sha256"], "state.json": sha256_file(ckpt / "state.json")})


@pytest.mark.slow
@pytest.mark.parametrize("value", ["auto", "false", "true"])
def test_runs_written_before_compile_became_a_bool_still_work(data_dir, tmp_path, capsys, value):
    from gpt2repro.cli import main

    run = tmp_path / "run"
    tr.train(small_cfg("max_steps=2"), data_dir, run)
    _as_written_before_compile_was_a_bool(run, value)
    assert gathered.read_config(ckptdir.latest(run)).compile is (value != "false")
    assert ckptdir.verify(ckptdir.latest(run))["step"] == 2
    tr.train(small_cfg("max_steps=3"), data_dir, run)  # resume
    assert sorted(losses(run)) == [0, 1, 2]
    _as_written_before_compile_was_a_bool(run, value)
    for argv in (
        ["sample", "--checkpoint", str(run), "-n", "1", "--max-new-tokens", "2"],
        ["export", "--checkpoint", str(run), "--out", str(tmp_path / "hf")],
        ["verify", str(run)],
        ["eval", "hellaswag", "--checkpoint", str(run), "--limit", "4"],
    ):
        assert main(argv) == 0, capsys.readouterr().err
    not_model = [o for o in SMALL if not o.startswith("model.")]  # init_from brings the architecture
    init = tr.train(
        train_config("cpu-tiny", [*not_model, "max_steps=1", f"init_from={run}"]), data_dir, tmp_path / "ft"
    )
    assert init["step"] == 1


def test_lr_schedule_on_the_time_clock():
    from gpt2repro.training.optim import lr_at, schedule_position

    cfg = train_config(
        "cpu-tiny", ["max_steps=100", "warmup_steps=10", "schedule_clock=time", "time_budget=50"]
    )
    assert schedule_position(20, 5.0, cfg) == 20  # the steps are further: they count
    assert schedule_position(20, 25.0, cfg) == 50  # half the budget spent: halfway, whatever the step
    assert lr_at(schedule_position(3, 50.0, cfg), cfg) == pytest.approx(cfg.max_lr * cfg.min_lr_ratio)
    for alone in ("schedule_clock=time", "time_budget=60"):  # either without the other would be ignored
        with pytest.raises(ConfigError, match="schedule_clock=time and time_budget > 0"):
            train_config("cpu-tiny", [alone]).validate()
    # the clock moves the schedule by fractions of a step: warmup never passes max_lr
    lrs = [lr_at(schedule_position(0, t / 10, cfg), cfg) for t in range(100)]
    assert max(lrs) == cfg.max_lr  # reached, never passed


def test_the_training_clock_counts_training_only():
    from gpt2repro.training.clock import TrainingClock

    cfg = train_config("cpu-tiny", ["schedule_clock=time", "time_budget=10"])
    clock = TrainingClock(cfg, DistInfo(0, 0, 1, torch.device("cpu")), torch.device("cpu"))
    assert clock.position(0, 29.0, compiling=True) == 0  # the step that compiled the model: not training
    clock.tick(30.0, compiling=True)  # time, and never the last step for its length
    assert clock.position(1, 3.5) == 1
    clock.tick(4.0, compiling=False)
    assert (
        clock.state_dict() == {"train_seconds": 4.0, "last_seconds": 4.0, "final": False}
        and not clock.spent()
    )
    assert clock.position(2, 3.0) == cfg.max_steps  # another 3 s step would pass the budget: the last,
    clock.tick(3.0, compiling=False)  # at the schedule's end
    assert clock.spent() and clock.left() == 3.0
    again = TrainingClock(cfg, DistInfo(0, 0, 1, torch.device("cpu")), torch.device("cpu"))
    again.load_state_dict(clock.state_dict())
    assert again.spent()
    again.load_state_dict({"train_seconds": 7.0, "last_seconds": 3.0})  # a checkpoint from before `final`
    assert again.spent()


class _HostClock:
    """time.time() for the trainer: each optimizer step takes 0.05 s, then `slow` s from step
    `after` on (the host slowed down); deterministic whatever the real machine is doing."""

    def __init__(self, monkeypatch, after: int, slow: float):
        self.now, self.steps, real = 1e9, 0, tr.Trainer.forward_backward

        def forward_backward(trainer):
            self.steps += 1
            self.now += slow if self.steps > after else 0.05
            return real(trainer)

        monkeypatch.setattr(tr, "time", self)
        monkeypatch.setattr(tr.Trainer, "forward_backward", forward_backward)

    def time(self) -> float:
        return self.now


@pytest.mark.slow
def test_a_host_that_slows_down_still_finishes_the_schedule_inside_its_budget(
    data_dir, tmp_path, monkeypatch
):
    """schedule_clock=time: steps 4x slower from step 3 on (the schedule planned 400 steps for a
    fast host) still run warmup and the whole cosine decay, ending inside the budget of training
    seconds; a SIGTERM half-way resumes the same clock from the checkpoint."""
    budget = 5.0
    cfg = small_cfg("max_steps=400", "warmup_steps=20", "schedule_clock=time", f"time_budget={budget}")
    _HostClock(monkeypatch, after=3, slow=0.2)
    stop_after(monkeypatch, 6)
    tr.train(cfg, data_dir, tmp_path)
    state = json.loads((ckptdir.latest(tmp_path) / "state.json").read_text())
    saved = state["clock"]  # the clock's own entry
    assert state["step"] == 6 and saved["train_seconds"] == pytest.approx(3 * 0.05 + 3 * 0.2)
    summary = tr.train(cfg, data_dir, tmp_path)
    steps = events(tmp_path, "train")
    assert [r["step"] for r in steps] == list(range(summary["step"]))
    assert summary["step"] == 3 + int((budget - 3 * 0.05) / 0.2)  # the last step that fits
    assert steps[6]["train_seconds"] == pytest.approx(saved["train_seconds"] + 0.2)  # the clock went on
    assert summary["train_seconds"] <= budget  # inside the budget
    min_lr, max_lr = cfg.max_lr * cfg.min_lr_ratio, cfg.max_lr
    assert steps[-1]["lr"] < min_lr + 0.05 * (max_lr - min_lr)  # the decay ran to (nearly) its end
    finished = ckptdir.latest(tmp_path).name
    tr.train(cfg, data_dir, tmp_path)  # run again: the schedule is complete, nothing more is trained
    assert len(events(tmp_path, "train")) == len(steps) and ckptdir.latest(tmp_path).name == finished
    lrs = [r["lr"] for r in steps]
    peak = lrs.index(max(lrs))
    assert 0 < peak < len(lrs) - 1 and lrs[:peak] == sorted(lrs[:peak])
    assert lrs[peak:] == sorted(lrs[peak:], reverse=True)


@pytest.mark.slow
@pytest.mark.parametrize("long_update", [None, 9])
def test_the_step_the_clock_makes_the_last_runs_at_the_schedules_end(
    data_dir, tmp_path, monkeypatch, long_update
):
    """schedule_clock=time: whichever step the clock ends the run at runs at the floor LR, the end of
    the decay, even when a step's update (after its LR is set) takes far longer than its forward and
    backward (`long_update`: the step whose update takes 0.6 s)."""
    budget = 2.0
    cfg = small_cfg("max_steps=400", "warmup_steps=2", "schedule_clock=time", f"time_budget={budget}")
    host = _HostClock(monkeypatch, after=400, slow=0.0)  # 0.05 s per forward and backward

    def synchronize(device):
        host.now += 0.6 if host.steps == (long_update or -1) + 1 else 0.0

    monkeypatch.setattr(tr, "synchronize", synchronize)
    summary = tr.train(cfg, data_dir, tmp_path)
    steps = events(tmp_path, "train")
    assert 5 < len(steps) < 400 and summary["train_seconds"] <= budget  # the clock ended it, inside budget
    assert steps[-1]["lr"] == pytest.approx(cfg.max_lr * cfg.min_lr_ratio, rel=1e-12)  # the floor
    assert all(r["lr"] > cfg.max_lr * cfg.min_lr_ratio * 1.01 for r in steps[:-1])  # only the last


def test_resuming_with_fewer_max_steps_than_the_checkpoint_is_one_line(data_dir, tmp_path):
    tr.train(small_cfg("max_steps=4"), data_dir, tmp_path)
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(tr.TrainingError, match="at step 4 with max_steps=2: set max_steps >= 4"):
        tr.train(small_cfg("max_steps=2"), data_dir, tmp_path)
    assert (tmp_path / "config.json").read_text() == before  # nothing rewritten


@pytest.mark.slow
def test_the_evaluation_due_at_a_signalled_step_runs_on_resume(data_dir, tmp_path, monkeypatch):
    """A SIGTERM saves step 4 at once, without its evaluation; the resume evaluates it (val loss and
    the target_val_loss check), then trains on, as an uninterrupted run does."""
    cfg = small_cfg("max_steps=6", "val_every=2", "val_steps=1", "target_val_loss=1")
    tr.train(cfg, data_dir, tmp_path / "straight")
    stop_after(monkeypatch, 4)
    tr.train(cfg, data_dir, tmp_path / "resumed")
    assert [r["step"] for r in events(tmp_path / "resumed", "val")] == [0, 2]
    monkeypatch.undo()
    tr.train(cfg, data_dir, tmp_path / "resumed")
    straight, resumed = events(tmp_path / "straight", "val"), events(tmp_path / "resumed", "val")
    assert [r["step"] for r in resumed] == [0, 2, 4, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]


def test_each_component_saves_itself_under_its_own_name(data_dir, tmp_path):
    """state.json: the loader's, the clock's and the loop's own state, each in its own entry."""
    tr.train(small_cfg("max_steps=2", "val_every=2", "val_steps=1"), data_dir, tmp_path)
    state = json.loads((ckptdir.latest(tmp_path) / "state.json").read_text())
    assert state["step"] == 2 and state["loader"]["consumed"] == 2 * state["loader"]["step_windows"]
    assert sorted(state["clock"]) == ["final", "last_seconds", "train_seconds"]
    assert state["clock"]["train_seconds"] == events(tmp_path, "train")[-1]["train_seconds"]
    assert state["trainer"]["evaluated"] is True
    assert state["trainer"]["metrics"]["val_loss"] == events(tmp_path, "val")[-1]["loss"]
    assert not {"train_seconds", "evaluated", "metrics"} & set(state)  # nothing loose at the top


@pytest.mark.slow
def test_a_checkpoint_written_before_components_saved_themselves_resumes(data_dir, tmp_path, monkeypatch):
    """The old layout (the clock's keys and `evaluated` at the top level) still resumes: a SIGTERM's
    unevaluated step 4 is evaluated on resume, the clock goes on from its seconds, and the losses
    are those of an uninterrupted run."""
    cfg = small_cfg("max_steps=6", "val_every=2", "val_steps=1")
    tr.train(cfg, data_dir, tmp_path / "straight")
    stop_after(monkeypatch, 4)
    tr.train(cfg, data_dir, tmp_path / "resumed")
    monkeypatch.undo()
    old = as_written_before_components_saved_themselves(ckptdir.latest(tmp_path / "resumed"))
    assert old["step"] == 4 and old["evaluated"] is False and old["train_seconds"] > 0
    tr.train(cfg, data_dir, tmp_path / "resumed")
    resumed = events(tmp_path / "resumed", "train")
    assert resumed[4]["train_seconds"] == pytest.approx(old["train_seconds"] + resumed[4]["dt"])
    assert [r["step"] for r in events(tmp_path / "resumed", "val")] == [0, 2, 4, 6]
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


def test_the_metrics_work_out_tokens_per_second_mfu_and_the_eta(monkeypatch):
    """The loop measures seconds; `Throughput` turns them into what is logged: tokens/s, MFU
    against the peak, the ETA at the pace since the loop (re)started, never past a budget's end."""
    from gpt2repro.training import mfu
    from gpt2repro.training.metrics import Throughput

    monkeypatch.setattr(mfu, "gemm_flops", lambda *a, **k: 1e9)
    mfu.device_peak_flops.cache_clear()
    try:
        peak = mfu.Peak(torch.device("cpu"), "fp32")
    finally:
        mfu.device_peak_flops.cache_clear()
    cfg = small_cfg("max_steps=10")  # 256 tokens a step
    throughput = Throughput(cfg, peak, flops_per_token=1000.0)
    throughput.start(2, now=100.0)  # resumed at step 2
    rates = throughput.rates(3, dt=0.5, now=104.0, left=None)  # 2 steps in 4 s, 6 to go
    assert rates == {"tok_per_s": 512.0, "mfu": 256 * 1000 / 0.5 / 1e9, "eta_s": 12.0, "mfu_peak": 1e9}
    assert throughput.rates(3, dt=0.5, now=104.0, left=5.0)["eta_s"] == 5.0


def test_a_train_event_holds_what_it_always_held(data_dir, tmp_path):
    """metrics.jsonl's train events keep their fields (the loop measures, `Throughput` adds the
    rates): readers of older runs and of new ones see the same keys."""
    tr.train(small_cfg("max_steps=1"), data_dir, tmp_path)
    (event,) = events(tmp_path, "train")
    fields = [
        "loss",
        "lr",
        "grad_norm",
        "dt",
        "tok_per_s",
        "mfu",
        "eta_s",
        "mfu_peak",
        "train_seconds",
        "epoch",
    ]
    assert sorted(event) == sorted(["event", "step", *fields])
    assert event["tok_per_s"] == pytest.approx(256 / event["dt"]) and event["eta_s"] == 0


def test_a_signalled_step_that_ends_the_resumed_run_is_saved_again_evaluated(data_dir, tmp_path, monkeypatch):
    """A SIGTERM saves step 4 unevaluated; a resume that ends at step 4 evaluates it and saves it
    again, now with its evaluation (the one time a run saves the step it resumed from)."""
    stop_after(monkeypatch, 4)
    tr.train(small_cfg("max_steps=6", "val_every=2", "val_steps=1"), data_dir, tmp_path)
    monkeypatch.undo()
    before = json.loads((ckptdir.latest(tmp_path) / "state.json").read_text())
    assert before["step"] == 4 and before["trainer"]["evaluated"] is False
    summary = tr.train(small_cfg("max_steps=4", "val_every=2", "val_steps=1"), data_dir, tmp_path)
    after = json.loads((ckptdir.latest(tmp_path) / "state.json").read_text())
    assert summary["step"] == after["step"] == 4 and after["trainer"]["evaluated"] is True
    assert (
        after["trainer"]["metrics"]["val_loss"] == summary["val_loss"] == events(tmp_path, "val")[-1]["loss"]
    )


def test_a_time_budget_is_kept_when_updates_take_most_of_each_step():
    """Each step spends 0.3 s before its LR is set and 0.7 s after (a slow optimizer): the run still
    ends within its budget, at the schedule's end; a resume with a larger budget goes on."""
    from gpt2repro.training.clock import TrainingClock

    cfg = train_config("cpu-tiny", ["schedule_clock=time", "time_budget=10"])
    clock = TrainingClock(cfg, DistInfo(0, 0, 1, torch.device("cpu")), torch.device("cpu"))
    step, positions = 0, []
    while not clock.spent():
        positions.append(clock.position(step, 0.3))
        clock.tick(1.0, compiling=False)
        step += 1
    assert 8.0 <= clock.train_seconds <= 10.0 and positions[-1] == cfg.max_steps
    bigger = TrainingClock(
        train_config("cpu-tiny", ["schedule_clock=time", "time_budget=20"]),
        DistInfo(0, 0, 1, torch.device("cpu")),
        torch.device("cpu"),
    )
    bigger.load_state_dict(clock.state_dict())
    assert not bigger.spent()
