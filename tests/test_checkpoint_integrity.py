"""Every byte of a checkpoint is verified: a manifest covers each file, state.json included, and
its own content; the step in state.json, the directory's name and the loader position must agree.
A checkpoint that fails is refused by `verify` and skipped by a resume, which says why and starts
from the newest good one. Checkpoints of older versions (no manifest) load with a notice."""

import json
import shutil

import pytest
import torch
from helpers import losses, small_cfg

from gpt2repro.checkpoint import ckptdir, resume
from gpt2repro.cli import main
from gpt2repro.data.loader import DataLoader
from gpt2repro.files.fsio import sha256_file
from gpt2repro.training import train as tr

CFG = ["ckpt_every=1", "keep_last=3", "shuffle=true"]
FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "config.json", "state.json")


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """A run with checkpoints after steps 1, 2, 3, and the same run straight to step 4."""
    root = tmp_path_factory.mktemp("integrity")
    tr.train(small_cfg(*CFG, "max_steps=3"), data_dir, root / "run")
    tr.train(small_cfg(*CFG, "max_steps=4"), data_dir, root / "straight")
    return root


@pytest.fixture
def run(runs, tmp_path):
    shutil.copytree(runs / "run", tmp_path / "run")
    return tmp_path / "run"


def _edit_state(ckpt, edit, rehash):
    """Change state.json; with `rehash`, write a manifest that matches the change (as a tool that
    'repairs' checksums would), so only the consistency checks can catch it."""
    state = json.loads((ckpt / "state.json").read_text())
    edit(state)
    (ckpt / "state.json").write_text(json.dumps(state))
    if rehash:
        ckptdir.write_manifest(ckpt, {name: sha256_file(ckpt / name) for name in FILES})


def _edit_manifest(ckpt, edit):
    manifest = json.loads((ckpt / "manifest.json").read_text())
    edit(manifest)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def _rewind_loader(state):
    state["loader"]["consumed"] -= state["loader"]["step_windows"]


TAMPERING = {
    "step": (lambda c: _edit_state(c, lambda s: s.update(step=1), False), "state.json: sha256 mismatch"),
    "step, manifest redone": (
        lambda c: _edit_state(c, lambda s: s.update(step=1), True),
        "state.json: step 1 does not match its directory step_00000003",
    ),
    "loader, manifest redone": (
        lambda c: _edit_state(c, _rewind_loader, True),
        "state.json: the loader position (epoch 0, 4 windows) is not where 3 steps of 2 windows end",
    ),
    "a file's entry": (
        lambda c: _edit_manifest(c, lambda m: m["files"]["optimizer.pt"].update(sha256="0" * 64)),
        "manifest.json: its own sha256 does not match its content",
    ),
    "state.json unlisted": (
        lambda c: ckptdir.write_manifest(c, {n: sha256_file(c / n) for n in FILES[:-1]}),
        "manifest.json: does not cover state.json",
    ),
    "manifest deleted": (lambda c: (c / "manifest.json").unlink(), "manifest.json: missing"),
}


@pytest.mark.parametrize("kind", TAMPERING)
def test_tampering_is_caught_by_verify_and_by_resume(run, runs, data_dir, capsys, kind):
    tamper, problem = TAMPERING[kind]
    tamper(ckptdir.step_dir(run, 3))
    capsys.readouterr()
    assert main(["verify", str(run)]) == 2
    out, err = capsys.readouterr()
    assert f"step_00000003/{problem}" in out and "1 of 3 checkpoints failed verification" in err
    tr.train(small_cfg(*CFG, "max_steps=4"), data_dir, run)
    out = capsys.readouterr().out
    assert f"step_00000003/{problem}" in out and "using step_00000002 instead" in out
    assert "resumed from step_00000002" in out
    assert losses(run) == losses(runs / "straight")


def test_ranks_sharing_a_directory_split_the_hashing_of_its_large_files(run, monkeypatch):
    """FSDP's ranks (`resume`): each hashes the JSON files it reads and a disjoint share of the rest,
    sizes checked by all; a file one rank finds corrupted refuses the checkpoint on every rank."""
    hashed = []
    real = ckptdir.sha256_file
    monkeypatch.setattr(ckptdir, "sha256_file", lambda path: hashed.append(path.name) or real(path))
    ckpt = ckptdir.step_dir(run, 3)
    check = resume._checker(True, refused := {})
    assert check(ckpt, print)["step"] == 3 and sorted(hashed) == ["config.json", "state.json"]
    shares = []
    for rank in range(2):
        hashed.clear()
        assert resume._verify_share(ckpt, rank, 2) is None
        shares.append(sorted(hashed))
    assert shares == [["model.safetensors", "rng.pt"], ["optimizer.pt"]]  # each file once
    with open(ckpt / "optimizer.pt", "r+b") as f:  # same size, other bytes: only its hash tells
        f.write(b"\0" * 8)
    assert check(ckpt, print)["step"] == 3 and resume._verify_share(ckpt, 0, 2) is None
    refused[ckpt] = resume._verify_share(ckpt, 1, 2)
    assert refused[ckpt] == f"{ckpt / 'optimizer.pt'}: sha256 mismatch (corrupted checkpoint)"
    with pytest.raises(ckptdir.CheckpointError, match="optimizer.pt: sha256 mismatch"):
        check(ckpt, print)
    found, state = ckptdir.latest_verified(run, lambda message: None, check)
    assert found.name == "step_00000002" and state["step"] == 2


def _as_older_version(ckpt):
    """What the previous version wrote: no manifest, state.json not covered by any checksum."""
    (ckpt / "manifest.json").unlink()
    state = json.loads((ckpt / "state.json").read_text())
    del state["manifest"]
    (ckpt / "state.json").write_text(json.dumps(state))


def test_checkpoints_of_older_versions_load_with_a_notice(run, runs, data_dir, capsys):
    for ckpt in ckptdir.all_steps(run):
        _as_older_version(ckpt)
    capsys.readouterr()
    assert main(["verify", str(run)]) == 0
    out, err = capsys.readouterr()
    assert "3 checkpoints verified" in out and err.count("predates checkpoint manifests") == 3
    older = ckptdir.step_dir(run, 3)
    state = json.loads((older / "state.json").read_text())
    (older / "state.json").write_text(json.dumps({**state, "step": 1}))  # the edit
    assert main(["verify", str(run)]) == 2
    assert "step_00000003/state.json: step 1 does not match its directory" in capsys.readouterr().out
    (older / "state.json").write_text(json.dumps(state))
    tr.train(small_cfg(*CFG, "max_steps=4"), data_dir, run)
    out = capsys.readouterr().out
    assert "step_00000003 predates checkpoint manifests" in out and "resumed from step_00000003" in out
    assert losses(run) == losses(runs / "straight")
    assert (ckptdir.step_dir(run, 4) / "manifest.json").is_file()  # new ones have it


@pytest.mark.parametrize("world,accum", [(1, 3), (2, 2)])
def test_the_loader_position_of_every_step_agrees_with_it(data_dir, world, accum):
    """No false alarm at epoch ends: step by step through three epochs (of the rank-0 loader; the
    state counts every rank's windows), the position checks out, and the neighbouring steps do not."""
    loader = DataLoader(data_dir, "train", 8, 64, 0, world, shuffle=True, step_windows=accum * world)
    steps_per_epoch = loader.steps_per_epoch // accum
    assert steps_per_epoch >= 2
    for step in range(3 * steps_per_epoch + 2):
        state = loader.state_dict()
        assert ckptdir.loader_mismatch(state, step) is None, (step, state)
        assert ckptdir.loader_mismatch(state, step + 1) is not None
        if step:
            assert ckptdir.loader_mismatch(state, step - 1) is not None
        for _ in range(accum):
            loader.next_batch()


def test_a_resume_on_fewer_gpus_restores_the_cuda_generators_it_has(monkeypatch):
    """Saved on 4 GPUs, resumed where 2 are visible: the 2 generators set, no IndexError traceback."""
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.setdefault(device, state))

    def set_all(states):  # as torch does: one default generator per visible device
        for i, state in enumerate(states):
            if i >= 2:
                raise IndexError("list index out of range")
            restored[i] = state

    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    tensors, plain = ckptdir.rng_state()
    cuda = [torch.full((8,), i, dtype=torch.uint8) for i in range(4)]
    ckptdir.set_rng_state({**tensors, "cuda": cuda}, plain)
    assert sorted(restored) == [0, 1] and all(torch.equal(restored[i], cuda[i]) for i in (0, 1))
