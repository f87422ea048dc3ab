"""Every user error the command line knows: one line on stderr naming the problem, exit code 2, no
traceback, nothing lost. Each row: the command, the bad input, a fragment of the expected message."""

import gzip
import json
import shutil

import numpy as np
import pytest
from helpers import BAD_OVERRIDES, SMALL, assert_one_line_error, run_main, train_argv

from conftest import shared_file
from gpt2repro.checkpoint import ckptdir
from gpt2repro.cli import main


@pytest.mark.parametrize(
    "overrides,fragment", BAD_OVERRIDES, ids=[" ".join(o)[:24] for o, _ in BAD_OVERRIDES]
)
def test_train_config_errors(capsys, data_dir, tmp_path, overrides, fragment):
    argv = [*train_argv(data_dir, "--out", tmp_path / "run"), *SMALL, *overrides]
    assert_one_line_error(capsys, argv, fragment)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any work


def test_train_run_directory_errors(capsys, data_dir, tmp_path):
    base = ["train", "--preset", "cpu-tiny", "--out", tmp_path / "run", *SMALL, "max_steps=1"]
    assert_one_line_error(capsys, [*base, "--data", tmp_path / "none"], "data directory does not exist")
    assert_one_line_error(capsys, [*base, "--data", data_dir, "--resume"], "no checkpoint to resume from")
    assert main([*map(str, base), "--data", str(data_dir), "ckpt_every=1"]) == 0
    saved = ckptdir.latest(tmp_path / "run")
    before = (saved / "model.safetensors").read_bytes()
    fragment = "holds checkpoints of an earlier run (step_00000001)"
    assert_one_line_error(capsys, [*base, "--data", data_dir, "resume=never"], fragment)
    other = tmp_path / "other"
    shutil.copytree(data_dir, other)
    (other / "train_000008.bin").unlink()
    assert_one_line_error(capsys, [*base, "--data", other, "max_steps=2"], "loader state has shards=")
    assert (saved / "model.safetensors").read_bytes() == before  # nothing lost
    (tmp_path / "a_file").write_text("not a directory")
    fragment = "a_file exists and is not a directory"
    assert_one_line_error(capsys, [*base, "--data", data_dir, "--out", tmp_path / "a_file"], fragment)
    fragment = "a_file: exists and is not a directory"
    assert_one_line_error(
        capsys, ["export", "--checkpoint", tmp_path / "run", "--out", tmp_path / "a_file"], fragment
    )
    assert (tmp_path / "a_file").read_text() == "not a directory"
    if not __import__("torch").cuda.is_available():
        fragment = "device=cuda requested but CUDA is not available"
        assert_one_line_error(
            capsys, [*base, "--data", data_dir, "device=cuda", "--out", tmp_path / "x"], fragment
        )


@pytest.fixture
def bad_sources(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    d = tmp_path / "src"
    d.mkdir()
    (d / "garbage.txt").write_bytes(
        np.random.default_rng(0).integers(128, 256, 3000, dtype=np.uint8).tobytes()
    )
    (d / "fake.jsonl.gz").write_text("not gzip")
    (d / "fake.parquet").write_text("not parquet")
    pq.write_table(pa.table({"text": [1, 2]}), d / "ints.parquet")
    pq.write_table(pa.table({"text": ["a", None]}), d / "nulls.parquet")
    (d / "empty.txt").write_text("")
    (d / "ok.txt").write_text("hello world")
    (d / "a-file").write_text("x")
    return d


PREPARE_CASES = [
    (["garbage.txt"], [], "garbage.txt: cannot read it as its extension says (UnicodeDecodeError"),
    (["fake.jsonl.gz"], [], "fake.jsonl.gz: cannot read it as its extension says (BadGzipFile"),
    (["fake.parquet"], [], "fake.parquet: cannot read it as its extension says (ArrowInvalid"),
    (["ints.parquet"], [], "ints.parquet (part 1, document 1): a 'text' value is int, not text"),
    (["nulls.parquet"], [], "nulls.parquet (part 1, document 2): a 'text' value is NoneType, not text"),
    (["empty.txt"], [], "empty.txt: empty file"),
    (["ok.txt"], ["--val-tokens", "-100"], "val_tokens must be at least 0, got -100"),
    (["ok.txt"], ["--max-tokens", "0"], "max_tokens must be at least 1, got 0"),
    (["ok.txt"], ["--workers", "-3"], "workers must be at least 1, got -3"),
    (["ok.txt"], ["--shard-tokens", "0"], "shard_tokens must be at least 1, got 0"),
    (["missing.txt"], [], "missing.txt': no such file"),
]


@pytest.mark.parametrize("sources,extra,fragment", PREPARE_CASES, ids=[c[2][:30] for c in PREPARE_CASES])
def test_prepare_errors(capsys, bad_sources, tmp_path, sources, extra, fragment):
    shared_file("gpt2.tiktoken")
    argv = ["prepare", "--source", *[bad_sources / s for s in sources], "--out", tmp_path / "out", *extra]
    assert_one_line_error(capsys, argv, fragment)
    assert not list((tmp_path / "out").glob("*.bin")) if (tmp_path / "out").exists() else True


def test_prepare_output_errors(capsys, bad_sources, tmp_path):
    shared_file("gpt2.tiktoken")
    src = bad_sources / "ok.txt"
    argv = ["prepare", "--source", src, "--out", bad_sources / "a-file" / "out"]
    assert_one_line_error(capsys, argv, "cannot create the output directory")
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{garbage")
    assert_one_line_error(
        capsys, ["prepare", "--source", src, "--out", out], "manifest.json: unreadable manifest"
    )
    assert (out / "manifest.json").read_text() == "{garbage"  # nothing overwritten


def test_a_bom_jsonl_is_read(capsys, tmp_path):
    shared_file("gpt2.tiktoken")
    src = tmp_path / "bom.jsonl"
    src.write_bytes(b'\xef\xbb\xbf{"text": "hello"}\n{"text": "x"}\n')
    assert main(["prepare", "--source", str(src), "--out", str(tmp_path / "o"), "--val-tokens", "0"]) == 0
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["total_tokens"] == 4


SAMPLE_CASES = [
    (["--prompt", "word" + " word" * 299], "the prompt is 300 tokens; this model's block_size is 256"),
    (["--prompt", ""], "the prompt is empty"),
    (["-n", "0"], "n and max_new_tokens must be at least 1, got 0 and 32"),
    (["--top-k", "-2"], "top_k must be at least 0 (0: no limit), got -2"),
    (["--top-p", "0"], "top_p must be above 0 and at most 1, got 0"),
    (["--max-new-tokens", "-10"], "n and max_new_tokens must be at least 1, got 4 and -10"),
    (["--temperature", "-1"], "temperature must be a finite number >= 0, got -1.0"),
    (["--temperature", "inf"], "temperature must be a finite number >= 0, got inf"),
]


@pytest.mark.parametrize("extra,fragment", SAMPLE_CASES, ids=[c[1][:24] for c in SAMPLE_CASES])
def test_sample_errors(capsys, run_dir, extra, fragment):
    shared_file("gpt2.tiktoken")
    assert_one_line_error(capsys, ["sample", "--checkpoint", run_dir, *extra], fragment)


def test_eval_errors(capsys, run_dir, tmp_path):
    shared_file("hellaswag_val.jsonl.gz")
    base = ["eval", "hellaswag", "--checkpoint", run_dir]
    for extra, fragment in [
        (["--batch-size", "0", "--limit", "2"], "batch size must be a positive number of examples, got 0"),
        (["--batch-size", "-2", "--limit", "2"], "batch size must be a positive number of examples, got -2"),
        (["--limit", "0"], "limit must be a positive number of examples (or none for all), got 0"),
        (["--limit", "-1"], "limit must be a positive number of examples (or none for all), got -1"),
        (["--limit", "2", "--json", tmp_path / "no" / "r.json"], "r.json: directory"),
    ]:
        assert_one_line_error(capsys, [*base, *extra], fragment)
    (tmp_path / "empty.jsonl").write_text("")
    assert_one_line_error(capsys, [*base, "--data", tmp_path / "empty.jsonl"], "empty.jsonl: no examples")
    row = json.loads(gzip.open(shared_file("hellaswag_val.jsonl.gz"), "rt").readline())
    (tmp_path / "blank.jsonl").write_text(json.dumps(dict(row, endings=["a", "", "b", "c"])) + "\n")
    fragment = "blank.jsonl:1: 'endings' must be a list of 4 non-empty strings"
    assert_one_line_error(capsys, [*base, "--data", tmp_path / "blank.jsonl"], fragment)


def test_plot_errors(capsys, tmp_path):
    assert_one_line_error(capsys, ["plot", tmp_path], "metrics.jsonl: no metrics (is this a run directory?)")
    (tmp_path / "metrics.jsonl").write_text("")
    assert_one_line_error(capsys, ["plot", tmp_path], "metrics.jsonl: no metrics recorded yet")
    (tmp_path / "metrics.jsonl").write_text('garbage\n{"event": "train", "step": 0, "loss": 1.0}\n')
    assert_one_line_error(capsys, ["plot", tmp_path], "metrics.jsonl:1: not a metrics record")


def test_plot_tolerates_a_torn_last_line(tmp_path):
    from gpt2repro.training.plot import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"event": "train", "step": 0, "loss": 1.0}\n{"event": "tr')
    assert read_metrics(tmp_path) == {"train": [{"event": "train", "step": 0, "loss": 1.0}]}


def test_bench_errors(capsys):
    assert_one_line_error(capsys, ["bench", "peak", "--repeats", "0"], "repeats must be at least 1, got 0")
    assert_one_line_error(capsys, ["bench", "train", "--mode", "bogus"], "unknown train mode(s) bogus")
    for factors in ("0.5,x", "0,1", ""):
        assert_one_line_error(capsys, ["bench", "learn", "--lr-factors", factors], "--lr-factors")
    learn = ["bench", "learn", "--presets", "cpu-tiny"]
    assert_one_line_error(capsys, [*learn, "--recipe", "muon_lr=-1"], "muon_lr=-1.0: expected a number >= 0")
    assert_one_line_error(capsys, [*learn, "--set", "bogus=1"], "unknown config key 'bogus'")


@pytest.mark.parametrize(
    "field,value,fragment",
    [
        ("n_layer", "12", "n_layer='12': expected a positive integer"),
        ("n_embd", None, "n_embd=None: expected a positive integer"),
        ("n_positions", 1e9, "block_size=1000000000.0: expected a positive integer"),
        ("n_positions", 10**9, "block_size=1000000000: expected at most 131072"),
    ],
)
def test_hf_config_errors(capsys, tmp_path, field, value, fragment):
    src = shared_file("tiny-gpt2")
    d = tmp_path / "hf"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, field: value}))
    assert_one_line_error(capsys, ["sample", "--hf", d], f"config.json: {fragment}")


def test_verify_command(capsys, run_dir, data_dir, tmp_path):
    assert main(["verify", str(data_dir)]) == 0 and "shards verified" in capsys.readouterr().out
    assert main(["verify", str(run_dir)]) == 0 and "checkpoints verified" in capsys.readouterr().out
    bad = tmp_path / "data"
    shutil.copytree(data_dir, bad)
    (bad / "val_000000.bin").write_bytes((bad / "val_000000.bin").read_bytes()[:-2] + b"\x00\x00")
    code, out, err = run_main(capsys, "verify", bad)
    assert code == 2 and "val_000000.bin: sha256 mismatch" in out
    assert err.strip() == f"gpt2repro: error: {bad}: 1 of 10 shards failed verification (listed above)"
    assert_one_line_error(capsys, ["verify", tmp_path / "nothing"], "neither a prepared data directory")


def test_finetune_and_source_errors(capsys, data_dir, tmp_path, monkeypatch):
    base = ["train", "--preset", "finetune", "--data", data_dir, "--out", tmp_path / "ft", "max_steps=1"]
    fragment = (
        "nowhere: not a directory and not a hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, or OWNER/"
    )
    assert_one_line_error(capsys, [*base, f"init_from={tmp_path / 'nowhere'}"], fragment)
    fragment = "model.n_embd cannot be set with init_from=gpt2: the architecture comes from the weights"
    assert_one_line_error(capsys, [*base, "model.n_embd=64"], fragment)
    (tmp_path / "notgpt2").mkdir()
    (tmp_path / "notgpt2" / "config.json").write_text(json.dumps({"activation_function": "relu"}))
    fragment = "unsupported activation_function 'relu'"
    assert_one_line_error(capsys, [*base, f"init_from={tmp_path / 'notgpt2'}"], fragment)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["prepare", "--source", "hf:someone/some-data", "--out", tmp_path / "p"]
    assert_one_line_error(
        capsys, argv, "cannot stream someone/some-data from the Hugging Face hub (offline mode"
    )
