"""FSDP runs on several ranks checkpoint through torch.distributed.checkpoint (`sharded`): a
safetensors shard per rank and nothing gathered, nothing unpickled on load, every shard covered by
the manifest, a resume on another number of ranks continuing the same losses, and `verify`,
`export` and `load_model` reading it like any checkpoint."""

import json
import pickle
import shutil
import struct

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import (
    EVERY_RANK_REPORTS,
    SMALL,
    as_written_before_components_saved_themselves,
    assert_one_line_error,
    error_lines,
    events,
    losses,
    run_main,
    run_script,
    run_to_end,
    small_cfg,
    train_argv,
)

from gpt2repro.checkpoint import ckptdir, gathered
from gpt2repro.checkpoint.ckptdir import CheckpointError
from gpt2repro.files.fsio import sha256_file
from gpt2repro.training import train as tr

pytestmark = pytest.mark.slow  # every test starts from a 2-rank run under torchrun

CONSTANT_LR = ["min_lr_ratio=1", "shuffle=true", "ckpt_every=2"]  # the LR does not depend on max_steps
# A global batch of 384 tokens is 6, 3 and 2 micro-batches of 2 x 32 on 1, 2 and 3 ranks: every run
# here takes it, so the 3-rank resume continues the same 2-rank run as the others.
BATCH = ["micro_batch_size=2", "total_batch_size=384"]
SHARDS = [f"shard-0000{rank}-model-00001-of-00001.safetensors" for rank in (1, 2)]


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """Two FSDP ranks on gloo to step 2 (`run`, continued by the resume test; `pristine`, a copy)."""
    root = tmp_path_factory.mktemp("sharded")
    args = train_argv(data_dir, *SMALL, *CONSTANT_LR, *BATCH, "fsdp=true", "max_steps=2")
    run_to_end([*args, "--out", root / "run"], nproc=2)
    shutil.copytree(root / "run", root / "pristine")
    return root


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory) -> dict[int, float]:
    """The losses of one uninterrupted process over 8 steps, which every resumed run here must take
    (the LR is constant after warmup, so a run to step 4 takes the first 4 of them)."""
    out = tmp_path_factory.mktemp("straight")
    run_to_end(
        [*train_argv(data_dir, *SMALL, *CONSTANT_LR, *BATCH, "fsdp=true"), "--out", out, "max_steps=8"]
    )
    return losses(out)


def assert_continues(straight, run, steps):
    """The run logged steps 0..steps-1 with the uninterrupted process's losses."""
    resumed = losses(run)
    assert sorted(resumed) == list(range(steps))
    for step, loss in resumed.items():
        assert loss == pytest.approx(straight[step], rel=1e-5)  # summation order differs across ranks


@pytest.fixture
def run(runs, tmp_path):
    shutil.copytree(runs / "pristine", tmp_path / "run")
    return tmp_path / "run"


def _chunks(path):
    """{name: (shape, offset in the full tensor)} from a shard's safetensors header."""
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    offsets = json.loads(header.pop("__metadata__")["DCP_SHARDING_INFO"])
    return {k: (v["shape"], offsets[k]["saved_offsets"]) for k, v in header.items()}


def test_each_rank_writes_only_its_own_shard(runs):
    ckpt = ckptdir.step_dir(runs / "pristine", 2)
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == sorted([*SHARDS, "config.json", "manifest.json", "optimizer.json", "state.json"])
    full = {f"model.{k}": v.shape for k, v in gathered.load_model(ckpt).state_dict().items()}
    first, second = (_chunks(ckpt / name) for name in SHARDS)
    for name, shape in full.items():
        if name == "model.lm_head.weight":  # tied: stored once, as wte
            assert name not in first and name not in second
            continue
        (rows_a, at_a), (rows_b, at_b) = first[name], second[name]
        # each rank holds a part of the rows, together all of them, and nothing twice
        assert at_a[0] == 0 and at_b[0] == rows_a[0] > 0 and rows_a[0] + rows_b[0] == shape[0], name
    moments = [k for k in first if k.endswith((".exp_avg", ".exp_avg_sq"))]
    assert len(moments) == 2 * (len(full) - 1) and set(moments) <= set(second)
    steps = [k for k in {**first, **second} if k.endswith(".step")]
    assert steps and all((k in first) != (k in second) for k in steps)  # replicated: written once
    sizes = [(ckpt / name).stat().st_size for name in SHARDS]
    assert max(sizes) < 0.55 * sum(sizes)
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert sorted(files) == sorted(set(names) - {"manifest.json"})


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the default-format sample
def test_a_load_never_unpickles(runs, data_dir, tmp_path, monkeypatch):
    """With pickle and torch.load refusing to run, DCP's default reader fails (its .metadata is a
    pickle), while load_model and a one-process resume of the sharded checkpoint succeed."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("unpickling refused by the test")

    dcp.save({"x": torch.ones(3)}, checkpoint_id=tmp_path / "default", no_dist=True)
    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(module, name, refuse)
    with pytest.raises(BaseException):  # noqa: B017 - whichever way DCP reports it
        dcp.load({"x": torch.zeros(3)}, checkpoint_id=tmp_path / "default", no_dist=True)
    assert calls, "the patch must catch the default reader's unpickling"
    calls.clear()
    loaded = gathered.load_model(runs / "pristine")
    shutil.copytree(runs / "pristine", tmp_path / "run")
    tr.train(small_cfg(*CONSTANT_LR, *BATCH, "fsdp=true", "max_steps=3"), data_dir, tmp_path / "run")
    assert calls == [] and sorted(losses(tmp_path / "run")) == [0, 1, 2]
    assert loaded.transformer.wte.weight.shape[1] == 64


def test_a_flipped_byte_in_a_shard_is_caught(run, capsys):
    shard = ckptdir.step_dir(run, 2) / SHARDS[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{SHARDS[1]}: sha256 mismatch"):
        ckptdir.verify(shard.parent)
    with pytest.raises(CheckpointError, match="no checkpoint of .* verifies"):
        gathered.load_model(run)
    assert_one_line_error(capsys, ["verify", run], "1 of 1 checkpoints failed verification")


def test_a_safetensors_file_the_manifest_does_not_list_is_refused(run):
    """DCP's reader takes every *.safetensors file of the directory: a stray one must not load."""
    ckpt = ckptdir.step_dir(run, 2)
    shutil.copy(ckpt / SHARDS[0], ckpt / "shard-00003-model-00001-of-00001.safetensors")
    with pytest.raises(CheckpointError, match="does not cover shard-00003"):
        ckptdir.verify(ckpt)


def test_a_shard_missing_a_tensor_is_one_line(run, capsys):
    """A shard rewritten without one weight and the manifest rehashed to match (as a tool that
    'repairs' checksums would): the load names what is missing instead of a traceback."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    ckpt = ckptdir.step_dir(run, 2)
    with safe_open(ckpt / SHARDS[0], framework="pt") as f:
        metadata = f.metadata()
        kept = {k: f.get_tensor(k) for k in f.keys() if k != "model.transformer.wpe.weight"}
    save_file(kept, ckpt / SHARDS[0], metadata=metadata)
    names = [p.name for p in ckpt.iterdir() if p.name != "manifest.json"]
    ckptdir.write_manifest(ckpt, {name: sha256_file(ckpt / name) for name in names})
    # DCP alone would load the other rank's half of wpe and leave the first half as initialised
    with pytest.raises(CheckpointError, match="shards hold 2048 values of model.transformer.wpe.weight"):
        gathered.load_model(run)
    assert_one_line_error(capsys, ["sample", "--checkpoint", run, "-n", "1"], "transformer.wpe.weight")


def test_verify_and_export_of_a_sharded_run(runs, tmp_path, capsys, enc):
    transformers = pytest.importorskip("transformers")
    assert ckptdir.is_sharded(ckptdir.step_dir(runs / "pristine", 2))
    code, out, _ = run_main(capsys, "verify", runs / "pristine")
    assert code == 0 and "1 checkpoints verified" in out
    code, _, err = run_main(capsys, "export", "--checkpoint", runs / "pristine", "--out", tmp_path / "hf")
    assert code == 0, err
    ours = gathered.load_model(runs / "pristine").eval()
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 50257, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx)[0][..., :50257], rtol=0, atol=1e-5)


def test_resume_two_ranks_one_process_two_ranks_continues_the_same_losses(runs, data_dir, straight):
    """2 FSDP ranks (sharded) -> 1 process (reads the shards) -> 2 ranks -> 2 ranks from the
    shards again: the losses of one uninterrupted process."""
    base = train_argv(data_dir, *SMALL, *CONSTANT_LR, *BATCH, "fsdp=true")
    elastic = ["--out", runs / "run"]
    out = run_to_end([*base, *elastic, "max_steps=4"])
    assert "x1 |" in out and "steps 2..4 | resumed from step_00000002" in out
    out = run_to_end([*base, *elastic, "max_steps=6"], nproc=2)
    assert "x2 |" in out and "steps 4..6 | resumed from step_00000004" in out
    out = run_to_end([*base, *elastic, "max_steps=8"], nproc=2)
    assert "x2 |" in out and "steps 6..8 | resumed from step_00000006" in out
    ckpts = ckptdir.all_steps(runs / "run")
    assert [ckptdir.is_sharded(c) for c in ckpts] == [False, True, True]  # keep_last=3: 4 (1 process), 6, 8
    assert_continues(straight, runs / "run", 8)


NODE_WITHOUT_SHARED_DISK = """
import os, sys
from gpt2repro.checkpoint import sharded
from gpt2repro.cli import main
if os.environ["RANK"] == "1":  # its 'node' has the same path on a disk of its own
    shared = sharded.HuggingFaceStorageWriter.__init__
    def elsewhere(self, path, *args, **kwargs):
        local = os.environ["NODE1_DISK"] + path
        os.makedirs(local, exist_ok=True)
        shared(self, local, *args, **kwargs)
    sharded.HuggingFaceStorageWriter.__init__ = elsewhere
sys.exit(main(sys.argv[1:]))
"""


def test_a_rank_that_wrote_its_shard_elsewhere_stops_the_save(data_dir, tmp_path):
    """A run directory not shared by every rank: rank 0 sees only its own shard. Nothing is
    published (before: a checkpoint without rank 1's half, verified by its manifest, unusable)."""
    script = tmp_path / "node.py"
    script.write_text(NODE_WITHOUT_SHARED_DISK)
    args = train_argv(
        data_dir, *SMALL, *CONSTANT_LR, *BATCH, "fsdp=true", "max_steps=2", "--out", tmp_path / "run"
    )
    out = run_script(script, *args, launcher=EVERY_RANK_REPORTS, NODE1_DISK=str(tmp_path / "node1"))
    errors = error_lines(out)
    assert out.returncode != 0 and len(errors) == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "is the run directory on a file system every rank shares?" in errors[0] + errors[1]
    assert ckptdir.all_steps(tmp_path / "run") == []
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name != "latest"]


def test_resume_two_ranks_on_three_reshards_uneven_shards(runs, data_dir, tmp_path, straight):
    """2 FSDP ranks (sharded) -> 3 ranks reading those shards: the 3 ranks split dim 0 unevenly
    (wpe's 64 rows, the MLP's 256: not multiples of 3) and continue one process's losses."""
    run = tmp_path / "run"
    shutil.copytree(runs / "pristine", run)
    base = train_argv(data_dir, *SMALL, *CONSTANT_LR, *BATCH, "fsdp=true")
    out = run_to_end([*base, "--out", run, "max_steps=4"], nproc=3)
    assert "x3 |" in out and "steps 2..4 | resumed from step_00000002" in out
    ckpt = ckptdir.step_dir(run, 4)
    names = sorted(p.name for p in ckpt.glob("*.safetensors"))
    assert names == [f"shard-0000{rank}-model-00001-of-00001.safetensors" for rank in (1, 2, 3)]
    rows = [_chunks(ckpt / name)["model.transformer.wpe.weight"][0][0] for name in names]
    assert sum(rows) == 64 and len(set(rows)) == 2  # uneven: 22, 22, 20
    assert_continues(straight, run, 4)


HASHES_RECORDED = """
import os, sys
from gpt2repro.checkpoint import ckptdir
from gpt2repro.cli import main
real = ckptdir.sha256_file
def recorded(path, *args, **kwargs):
    with open(os.environ["HASH_LOG"] + os.environ["RANK"], "a") as log:
        log.write(str(path) + "\\n")
    return real(path, *args, **kwargs)
ckptdir.sha256_file = recorded
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def old_layout_resumed(runs, data_dir, tmp_path_factory):
    """FSDP's step-2 shards with state.json in the old layout (the clock's keys at the top level),
    resumed by 2 ranks to step 4: (the run, the old state, the output). The hashing test goes on
    from its two sharded checkpoints (a launch fewer)."""
    run = tmp_path_factory.mktemp("old") / "run"
    shutil.copytree(runs / "pristine", run)
    old = as_written_before_components_saved_themselves(ckptdir.step_dir(run, 2))
    base = train_argv(data_dir, *SMALL, *CONSTANT_LR, *BATCH, "fsdp=true")
    out = run_to_end([*base, "--out", run, "max_steps=4"], nproc=2)
    return run, old, out


def test_ranks_split_the_hashing_and_fall_back_together(old_layout_resumed, data_dir, tmp_path):
    """Resuming, FSDP's ranks hash each shard once between them (not every shard on every rank); a
    corrupted shard of the newest checkpoint, hashed by one rank only, sends both to the older one."""
    run = tmp_path / "run"
    shutil.copytree(old_layout_resumed[0], run)
    base = train_argv(data_dir, *SMALL, *CONSTANT_LR, *BATCH, "fsdp=true", "--out", run)
    shard = ckptdir.step_dir(run, 4) / SHARDS[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1  # the same size: only its hash can tell
    shard.write_bytes(bytes(data))
    script = tmp_path / "probe.py"
    script.write_text(HASHES_RECORDED)
    out = run_script(script, *base, "max_steps=6", HASH_LOG=str(tmp_path / "hashed."))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "steps 2..6 | resumed from step_00000002" in out.stdout
    assert f"{SHARDS[1]}: sha256 mismatch" in out.stdout and "using step_00000002 instead" in out.stdout
    hashed = [(tmp_path / f"hashed.{rank}").read_text().splitlines() for rank in (0, 1)]
    for step in (2, 4):
        shards = [str(ckptdir.step_dir(run, step) / name) for name in SHARDS]
        by_rank = [sorted(p for p in paths if p in shards) for paths in hashed]
        assert sorted(by_rank[0] + by_rank[1]) == sorted(shards)  # each shard hashed once
    assert losses(run).keys() == set(range(6))


def test_a_ddp_run_resumes_from_fsdp_shards(runs, data_dir, tmp_path, straight):
    """fsdp=true on 2 ranks (sharded) -> fsdp=false on 2 ranks (DDP: every rank reads whole tensors
    from the shards): the losses of one uninterrupted process; DDP then writes the gathered format."""
    run = tmp_path / "run"
    shutil.copytree(runs / "pristine", run)
    base = train_argv(data_dir, *SMALL, *CONSTANT_LR, *BATCH)
    out = run_to_end([*base, "fsdp=false", "--out", run, "max_steps=4"], nproc=2)
    assert "x2 |" in out and "steps 2..4 | resumed from step_00000002" in out
    assert not ckptdir.is_sharded(ckptdir.step_dir(run, 4))
    assert_continues(straight, run, 4)


def test_a_sharded_checkpoint_written_before_components_saved_themselves_resumes(
    old_layout_resumed, straight
):
    """FSDP's shards with state.json in the old layout (the clock's keys at the top level): 2 ranks
    resume them, the clock going on from its seconds, with the losses of one uninterrupted process."""
    run, old, out = old_layout_resumed
    assert ckptdir.is_sharded(ckptdir.step_dir(run, 2)) and old["train_seconds"] > 0
    assert "steps 2..4 | resumed from step_00000002" in out
    step = events(run, "train")[2]
    assert step["step"] == 2 and step["train_seconds"] == pytest.approx(old["train_seconds"] + step["dt"])
    assert_continues(straight, run, 4)
