"""The `gpt2repro` command end to end, and its one-line errors."""

import json

import pytest
from helpers import assert_one_line_error

from conftest import shared_file
from gpt2repro.cli import main


def test_sample_from_checkpoint(run_dir, capsys):
    assert (
        main(["sample", "--checkpoint", str(run_dir), "-n", "2", "--max-new-tokens", "5", "--device", "cpu"])
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("> Hello, I'm a language model,") for line in lines)


def test_sample_from_hf_directory_is_seeded(capsys):
    tiny = str(shared_file("tiny-gpt2"))
    main(["sample", "--hf", tiny, "--prompt", "The cat", "-n", "1", "--seed", "3"])
    a = capsys.readouterr().out
    main(["sample", "--hf", tiny, "--prompt", "The cat", "-n", "1", "--seed", "3"])
    assert capsys.readouterr().out == a and a.startswith("> The cat")


def test_sample_with_compiled_steps_prints_the_same_samples(capsys):
    """`sample --compile` (the one-token steps compiled whole): the same seeded samples as eager."""
    tiny = str(shared_file("tiny-gpt2"))
    args = ["sample", "--hf", tiny, "--prompt", "The cat", "-n", "2", "--seed", "3", "--max-new-tokens", "24"]
    assert main(args) == 0
    eager = capsys.readouterr().out
    from unittest import mock

    from gpt2repro.generation.decoding import Decoder

    calls, original = [], Decoder._compiled

    def counted(self, args):  # the compiled step, counting its calls
        calls.append(1)
        return original(self, args)

    with mock.patch.object(Decoder, "_compiled", counted):
        assert main([*args, "--compile"]) == 0
    assert len(calls) == 23  # every token after the first (read with the prompt) until the 24th
    assert capsys.readouterr().out == eager and eager.count("> The cat") == 2


def test_export_then_transformers_loads_it(run_dir, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    assert model.config.n_layer == 2
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == 50256


def test_eval_hellaswag_cli_writes_json_and_predictions(tmp_path, capsys):
    shared_file("hellaswag_val.jsonl.gz")
    tiny = str(shared_file("tiny-gpt2"))
    argv = [
        "eval",
        "hellaswag",
        "--hf",
        tiny,
        "--limit",
        "6",
        "--style",
        "both",
        "--json",
        str(tmp_path / "r.json"),
        "--predictions",
        str(tmp_path / "p.jsonl"),
        "--verbose",
    ]
    from unittest import mock

    from gpt2repro.training import heap

    with mock.patch.object(heap, "reuse_freed_memory", wraps=heap.reuse_freed_memory) as reuse:
        assert main(argv) == 0
    assert reuse.call_count == 1  # on a CPU, eval's large tensors come from the heap, as training's
    out = capsys.readouterr().out
    assert "hellaswag [completion] n=6" in out and "logprob=" in out
    results = json.loads((tmp_path / "r.json").read_text())
    assert set(results) == {"completion", "harness"}
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and [r["index"] for r in rows[:6]] == list(range(6))


def test_bad_inputs_are_one_line_errors(run_dir, tmp_path, capsys, data_dir):
    assert_one_line_error(
        capsys, ["sample", "--hf", str(tmp_path / "missing")], "not a directory and not a hub name"
    )
    assert_one_line_error(capsys, ["sample", "--checkpoint", str(tmp_path / "missing")], "not a checkpoint")
    for flags, problem in (  # refused before a model is read (this one is missing)
        (["--logit-bias", "13=500"], "logit_bias must map token ids >= 0 to -100..100, got 13: 500.0"),
        (["--logit-bias", "13:5"], "expected TOKEN=BIAS (a token id and a number), got '13:5'"),
        (["--presence-penalty", "2.5"], "presence_penalty must be between -2 and 2, got 2.5"),
        (["--frequency-penalty", "-3"], "frequency_penalty must be between -2 and 2, got -3.0"),
    ):
        assert_one_line_error(capsys, ["sample", "--checkpoint", str(tmp_path / "missing"), *flags], problem)
    assert_one_line_error(  # a token id past the vocabulary (the server: 400), in a first --logit-bias of two
        capsys,
        ["sample", "--checkpoint", str(run_dir), "--logit-bias", "50257=1", "--logit-bias", "13=1"],
        "logit_bias must map token ids >= 0 and < 50257 to -100..100, got 50257: 1.0",
    )
    assert_one_line_error(
        capsys,
        ["train", "--preset", "nope", "--data", str(data_dir), "--out", str(tmp_path)],
        "unknown training preset 'nope'",
    )
    assert_one_line_error(
        capsys,
        ["train", "--preset", "cpu-tiny", "--data", str(data_dir), "--out", str(tmp_path), "lr=1"],
        "unknown config key 'lr'",
    )
    assert_one_line_error(
        capsys,
        ["train", "--preset", "cpu-tiny", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path)],
        "data directory does not exist",
    )
    assert_one_line_error(
        capsys,
        ["eval", "hellaswag", "--hf", str(shared_file("tiny-gpt2")), "--data", str(tmp_path / "none.jsonl")],
        "no such file",
    )
    assert_one_line_error(
        capsys,
        ["prepare", "--source", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o")],
        "no such file",
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((shared_file("tiny-gpt2") / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x01\x02garbage")
    assert_one_line_error(capsys, ["sample", "--hf", str(broken)], "corrupted or unreadable")
    assert_one_line_error(
        capsys, ["export", "--checkpoint", str(run_dir), "--out", str(run_dir)], "not empty"
    )


def test_prepare_and_presets_commands(tmp_path, capsys, enc):
    src = tmp_path / "a.txt"
    src.write_text("hello world " * 50)
    assert (
        main(
            [
                "prepare",
                "--source",
                str(src),
                "--out",
                str(tmp_path / "o"),
                "--shard-tokens",
                "1000",
                "--val-tokens",
                "20",
            ]
        )
        == 0
    )
    assert "102 tokens from 1 documents in 2 shards" in capsys.readouterr().out
    assert main(["presets"]) == 0
    assert "gpt2-124m-10B" in capsys.readouterr().out
