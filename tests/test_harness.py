"""`gpt2repro eval harness`: lm-evaluation-harness tasks through its Python API, offline with a local
copy of the harness's own HellaSwag task, equal to `eval hellaswag --style harness`."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import shared_file
from gpt2repro.checkpoint import gathered
from gpt2repro.cli import main
from gpt2repro.evals import harness
from gpt2repro.evals import hellaswag as hs

lm_eval = pytest.importorskip("lm_eval")


@pytest.fixture(scope="session")
def hellaswag_task_dir(tmp_path_factory):
    """lm-eval's hellaswag task (its YAML and utils.py) reading the official validation file: one
    directory a session, so lm-eval's index of it (~6 s a build) is built once a process."""
    data = shared_file("hellaswag_val.jsonl.gz")
    original = Path(lm_eval.__file__).parent / "tasks" / "hellaswag"
    tasks = tmp_path_factory.mktemp("tasks")
    shutil.copy(original / "utils.py", tasks / "utils.py")
    yaml = (original / "hellaswag.yaml").read_text()
    yaml = yaml.replace("task: hellaswag", "task: hellaswag_local").replace(
        "dataset_path: Rowan/hellaswag", "dataset_path: json"
    )
    yaml = yaml.replace("training_split: train", f"dataset_kwargs:\n  data_files:\n    validation: {data}")
    yaml = "\n".join(
        line for line in yaml.splitlines() if not line.startswith(("tag:", "  - multiple_choice"))
    )
    (tasks / "hellaswag_local.yaml").write_text(yaml + "\n")
    return tasks


@pytest.fixture
def local_hellaswag(hellaswag_task_dir, tmp_path, monkeypatch):
    """The local hellaswag task, offline, its data set cached in this test's directory."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    return hellaswag_task_dir


@pytest.mark.slow
def test_harness_hellaswag_equals_our_harness_style(run_dir, local_hellaswag, tmp_path, capsys):
    limit = 40
    out = tmp_path / "harness.json"
    argv = ["eval", "harness", "--checkpoint", run_dir, "--tasks", "hellaswag_local", "--limit", limit]
    assert main([str(a) for a in [*argv, "--include-path", local_hellaswag, "--json", out]]) == 0
    theirs = json.loads(out.read_text())["hellaswag_local"]
    model = gathered.load_model(run_dir)
    ours = hs.evaluate(model, hs.load_examples(limit=limit), "harness")
    assert ours["n"] == limit
    assert (theirs["acc"], theirs["acc_norm"]) == (ours["acc"], ours["acc_norm"])
    assert "hellaswag_local: acc=" in capsys.readouterr().out


def test_loglikelihoods_match_a_direct_computation(run_dir):
    """Scored sums equal log-softmax of a plain forward pass, for a long context cut to block_size too."""
    shared_file("gpt2.tiktoken")
    model = gathered.load_model(run_dir).eval()
    block = model.config.block_size
    pairs = [([5, 6, 7], [8, 9]), (list(range(1, block + 20)), [42, 43, 44])]
    got = harness.score_tokens(model, pairs, batch_size=2, device=torch.device("cpu"), dtype="fp32")
    for (ctx, cont), (logprob, _) in zip(pairs, got):
        tokens = (ctx + cont)[-(block + 1) :]
        with torch.no_grad():
            logits = model(torch.tensor([tokens[:-1]]))[0][0].log_softmax(-1)
        expected = sum(float(logits[len(tokens) - 1 - len(cont) + k, t]) for k, t in enumerate(cont))
        assert logprob == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_harness_errors(run_dir, local_hellaswag, capsys, monkeypatch):
    base = ["eval", "harness", "--checkpoint", str(run_dir)]
    assert main([*base, "--tasks", "no_such_task", "--include-path", str(local_hellaswag)]) == 2
    assert capsys.readouterr().err.strip() == "gpt2repro: error: unknown lm-eval task(s): no_such_task"
    assert (
        main([*base, "--tasks", "hellaswag_local", "--limit", "0", "--include-path", str(local_hellaswag)])
        == 2
    )
    assert "limit must be at least 1, got 0" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "lm_eval.api.model", None)  # as if not installed
    assert main([*base, "--tasks", "hellaswag"]) == 2
    assert capsys.readouterr().err.strip() == (
        "gpt2repro: error: eval harness needs lm-evaluation-harness: pip install 'gpt2repro[eval]'"
    )
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
