"""The CORE metric on fixture tasks built from local data (HellaSwag rows as multiple choice, Tiny
Shakespeare as schema and language modeling), item by item against an independent float64 scorer
over transformers' GPT2LMHeadModel on the exported model; its arithmetic; the bundle's checks."""

import csv
import gzip
import json
import math
import random
import zipfile

import pytest
import torch
import torch.nn.functional as F

from conftest import shared_file
from gpt2repro.bench.hubserver import Faults, LocalHub
from gpt2repro.cli import main
from gpt2repro.config.schema import model_config
from gpt2repro.evals import core, core_data
from gpt2repro.files import assets
from gpt2repro.model.gpt import GPT

transformers = pytest.importorskip("transformers")
jinja2 = pytest.importorskip("jinja2")

BLOCK = 96  # the tiny model's context: the few-shot prompts are longer, so they are truncated

# nanochat's prompt templates (core_eval.py), rendered by Jinja as there: the reference renders
# through them, the code under test by its own string building
TEMPLATES = {
    "multiple_choice": """
{%- for example in fewshot_examples -%}
{{ example.query }}{{ continuation_delimiter }}{{ example.choices[example.gold] }}

{% endfor -%}
{{ item.query }}{{ continuation_delimiter }}{{ choice }}""",
    "schema": """
{%- for example in fewshot_examples -%}
{{ example.context_options[example.gold] }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ context }}{{ continuation_delimiter }}{{ item.continuation }}""",
    "language_modeling": """
{%- for example in fewshot_examples -%}
{{ example.context | trim }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ item.context | trim }}{{ continuation_delimiter }}{% if include_continuation %}{{ item.continuation }}{% endif %}""",
}


def hellaswag_rows(n):
    with gzip.open(shared_file("hellaswag_val.jsonl.gz"), "rt") as f:
        rows = [json.loads(next(f)) for _ in range(n)]
    return [{"query": r["ctx"], "choices": r["endings"], "gold": r["label"]} for r in rows]


def shakespeare_lines():
    text = shared_file("tinyshakespeare.txt").read_text()
    return [line.strip() for line in text.splitlines() if len(line.split()) >= 6][:400]


def schema_rows(n):
    """Each line cut after its third word: the true start and two other lines' starts as options."""
    lines, rng = shakespeare_lines(), random.Random(0)
    rows = []
    for i in range(n):
        words = lines[i].split()
        options = [" ".join(words[:3])] + [" ".join(lines[j].split()[:3]) for j in rng.sample(range(400), 2)]
        gold = rng.randrange(3)
        options[0], options[gold] = options[gold], options[0]
        rows.append({"context_options": options, "continuation": " ".join(words[3:]), "gold": gold})
    return rows


def lm_rows(n):
    """A line's last word as the continuation of the line (LAMBADA's shape); context ends with a
    space, as some bundle rows do."""
    rows = []
    for line in shakespeare_lines()[100 : 100 + n]:
        head, last = line.rsplit(" ", 1)
        rows.append({"context": head + " ", "continuation": last})
    return rows


def learnable_rows(n):
    """A line's first words; the choices are the rest of the line and letters drawn at random (a
    model trained on Tiny Shakespeare soon tells them apart: CORE rises within a few steps)."""
    rng = random.Random(1)
    rows = []
    for line in shakespeare_lines()[200 : 200 + n]:
        words = line.split()
        junk = " ".join("".join(rng.choice("qxzjkvw") for _ in range(len(w))) for w in words[3:])
        gold = rng.randrange(2)
        choices = [junk, " ".join(words[3:])] if gold else [" ".join(words[3:]), junk]
        rows.append({"query": " ".join(words[:3]), "choices": choices, "gold": gold})
    return rows


TASKS = [  # label, type, shots, delimiter, baseline, rows
    ("hs0", "multiple_choice", 0, " ", 25.0, lambda: hellaswag_rows(4)),
    ("hs3", "multiple_choice", 3, " ", 25.0, lambda: hellaswag_rows(6)),
    ("sch2", "schema", 2, " ", 50.0, lambda: schema_rows(5)),
    ("lm1", "language_modeling", 1, " ", 0.0, lambda: lm_rows(5)),
]


def write_bundle(root, tasks=TASKS, extra_rows=None):
    (root / "eval_data" / "fx").mkdir(parents=True)
    entries = []
    for label, kind, shots, delim, _, rows in tasks:
        data = rows() + (extra_rows or {}).get(label, [])
        (root / "eval_data" / "fx" / f"{label}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
        entries.append(
            f"- label: {label}\n  dataset_uri: fx/{label}.jsonl\n  num_fewshot: [{shots}]\n"
            f"  icl_task_type: {kind}\n  continuation_delimiter: {json.dumps(delim)}\n"
        )
    (root / "core.yaml").write_text("icl_tasks:\n" + "".join(entries))
    with open(root / "eval_meta_data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Eval Task", "Task category", "Random baseline"])
        for label, kind, _, _, baseline, _ in tasks:
            w.writerow([label, kind, baseline])
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny model of ours with a 96-token context, and transformers' float64 copy of its export."""
    from gpt2repro.interop.hf import export_hf

    torch.manual_seed(7)
    ours = GPT(model_config("tiny", block_size=BLOCK, vocab_multiple=64)).eval()
    out = export_hf(ours, tmp_path_factory.mktemp("hf") / "export")
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).double().eval()
    return ours, hf, out


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, models):
    return write_bundle(tmp_path_factory.mktemp("bundle"))


def reference(hf, task_meta, data, idx, enc):
    """One item as nanochat's core_eval scores it, written out again: Jinja prompts, tiktoken, the
    rows one at a time through transformers in float64."""
    item, kind, k = data[idx], task_meta["type"], task_meta["shots"]
    shots = []
    if k:
        shots = [
            data[i] for i in random.Random(1234 + idx).sample([i for i in range(len(data)) if i != idx], k)
        ]
    template = jinja2.Template(TEMPLATES[kind].strip())
    ctx = {"fewshot_examples": shots, "continuation_delimiter": task_meta["delim"], "item": item}
    if kind == "multiple_choice":
        texts = [template.render(choice=c, **ctx) for c in item["choices"]]
    elif kind == "schema":
        texts = [template.render(context=c, **ctx) for c in item["context_options"]]
    else:
        texts = [template.render(include_continuation=i, **ctx) for i in (False, True)]
        texts[0] = texts[0].strip()
    rows = [[50256] + enc.encode(t) for t in texts]
    if kind == "multiple_choice":
        start = next(
            i
            for i in range(min(map(len, rows)) + 1)
            if i == min(map(len, rows)) or len({r[i] for r in rows}) > 1
        )
        spans = [(start, len(r)) for r in rows]
    elif kind == "schema":
        m = min(map(len, rows))
        suffix = next(i for i in range(m + 1) if i == m or len({r[-1 - i] for r in rows}) > 1)
        spans = [(len(r) - suffix, len(r)) for r in rows]
    else:
        spans, rows = [(len(rows[0]), len(rows[1]))], rows[1:]
    losses, greedy = [], []
    for row, (s, e) in zip(rows, spans):
        crop = max(0, len(row) - BLOCK)
        row, s, e = row[crop:], s - crop, e - crop
        with torch.no_grad():
            logits = hf(torch.tensor([row])).logits[0]
        loss = F.cross_entropy(logits[s - 1 : e - 1], torch.tensor(row[s:e]), reduction="none")
        losses.append(loss.mean().item())
        greedy.append(bool((logits[s - 1 : e - 1].argmax(-1) == torch.tensor(row[s:e])).all()))
    if kind == "language_modeling":
        return {"correct": greedy[0]}
    pred = losses.index(min(losses))
    return {"correct": pred == item["gold"], "pred": pred, "mean_losses": losses}


def test_items_agree_with_the_float64_reference(models, bundle_dir, enc):
    ours, hf, _ = models
    bundle = core_data.load_bundle(bundle_dir)
    truncated = 0
    for task in bundle.tasks:
        details = []
        result = core.evaluate_task(ours, task, batch_size=3, details=details)
        meta = {"type": task.task_type, "shots": task.num_fewshot, "delim": task.delimiter}
        assert [d["index"] for d in details] == list(range(len(task.items)))
        for d in details:
            ref = reference(hf, meta, task.items, d["index"], enc)
            assert d["correct"] == ref["correct"], (task.label, d["index"])
            if task.task_type != "language_modeling":
                assert d["pred"] == ref["pred"]
                assert d["mean_losses"] == pytest.approx(ref["mean_losses"], abs=1e-4)
        truncated += sum(
            len(r) == BLOCK for i in range(len(task.items)) for r in core.prepare(task, i, BLOCK).rows
        )
        correct = sum(d["correct"] for d in details)
        assert result["n"] == len(task.items) and result["accuracy"] == correct / len(task.items)
    assert truncated > 0  # some prompts were longer than the context


def test_greedy_language_modeling_marks_a_continuation_the_model_predicts(models, tmp_path, enc):
    """Items whose continuation is what the model decodes greedily are correct, item by item with
    the reference (a fixture where every language-modeling item is wrong would test little)."""
    ours, hf, _ = models
    rows = []
    for row in lm_rows(30):
        prompt = [50256] + enc.encode(row["context"].strip())
        with torch.no_grad():
            nxt = int(hf(torch.tensor([prompt[-BLOCK:]])).logits[0, -1].argmax())
        text = enc.decode([nxt])
        if text.strip() and enc.encode(row["context"].strip() + text) == prompt[1:] + [nxt]:
            rows.append({"context": row["context"], "continuation": text})
        if len(rows) == 3:
            break
    rows += [{"context": r["context"], "continuation": " " + r["continuation"]} for r in lm_rows(3)]
    task = core_data.Task("lm", "language_modeling", 0, "", 0.0, rows, list(range(1, len(rows) + 1)))
    details = []
    core.evaluate_task(ours, task, details=details, batch_size=4)
    meta = {"type": "language_modeling", "shots": 0, "delim": ""}
    expected = [reference(hf, meta, rows, i, enc)["correct"] for i in range(len(rows))]
    assert [d["correct"] for d in details] == expected and any(expected) and not all(expected)


def test_sharded_and_batched_give_the_same_verdicts(models, bundle_dir):
    """Ranks' shares (item i on rank i % 2) and any batch size: the single-process verdicts."""
    ours = models[0]
    task = core_data.load_bundle(bundle_dir, tasks=["hs3"]).tasks[0]
    whole = []
    core.evaluate_task(ours, task, batch_size=1, details=whole)
    shares = []
    for rank in (0, 1):
        core.evaluate_task(ours, task, rank=rank, world_size=2, batch_size=8, details=shares)
    by_index = {d["index"]: d for d in shares}
    for d in whole:
        assert by_index[d["index"]]["pred"] == d["pred"]
        assert by_index[d["index"]]["mean_losses"] == pytest.approx(d["mean_losses"], abs=1e-5)


def test_centered_accuracy_and_core_mean_by_hand():
    assert core.centered(0.25, 25.0) == 0.0
    assert core.centered(1.0, 62.0) == 1.0
    assert core.centered(0.61, 50.0) == pytest.approx(0.22)
    assert core.centered(0.2524, 9.1) == pytest.approx((0.2524 - 0.091) / 0.909)
    assert core.centered(0.4, 0.0) == 0.4
    results = {"a": {"centered": 0.22}, "b": {"centered": -0.1}, "c": {"centered": 0.4}}
    assert core.core_metric(results) == pytest.approx(0.52 / 3)


def test_lowest_mean_loss_picks_like_pythons_min():
    assert core.lowest([2.0, 1.0, 1.0]) == 1
    assert core.lowest([math.nan, 1.0]) == 0 and core.lowest([1.0, math.nan, 0.5]) == 2


def test_max_per_task_is_nanochats_shuffle_then_cut(bundle_dir):
    full = core_data.load_bundle(bundle_dir, tasks=["hs3"]).tasks[0]
    rows = hellaswag_rows(6)
    shuffled = list(rows)
    random.Random(1337).shuffle(shuffled)
    assert full.items == shuffled and full.total == 6
    cut = core_data.load_bundle(bundle_dir, tasks=["hs3", "lm1"], max_per_task=4)
    assert [t.label for t in cut.tasks] == ["hs3", "lm1"]
    assert cut.tasks[0].items == shuffled[:4] and cut.tasks[0].total == 6
    assert any("at most 4 items per task" in n for n in cut.notes)
    with pytest.raises(core_data.CoreError, match="too few for 3-shot"):
        core_data.load_bundle(bundle_dir, tasks=["hs3"], max_per_task=3)


def test_tampered_bundle_file_is_refused_with_one_line(tmp_path, models, capsys):
    root = write_bundle(tmp_path / "b", TASKS[:1])
    first = core_data.load_bundle(root)
    assert any("recorded the sha256s" in n for n in first.notes)
    assert core_data.load_bundle(root).notes == []  # checked now, nothing recorded again
    path = root / "eval_data" / "fx" / "hs0.jsonl"
    path.write_text(path.read_text().replace("A", "a", 1))
    code = main(["eval", "core", "--hf", str(models[2]), "--bundle", str(root), "--device", "cpu"])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("gpt2repro: error: ")
    assert "hs0.jsonl: sha256 mismatch" in lines[0]


def test_download_is_verified_unpacked_and_recorded(tmp_path, monkeypatch):
    src = write_bundle(tmp_path / "src" / "eval_bundle", TASKS[:1])
    archive = tmp_path / "eval_bundle.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(src.parent).as_posix())
    hub = LocalHub()
    with hub:  # a mirror of the bundle's URL that fails on purpose: a 503, a reset, then the bytes
        url = hub.serve_file("mirror/eval_bundle.zip", archive.read_bytes())
        monkeypatch.setenv("GPT2REPRO_MIRROR_URL", url.rsplit("/", 1)[0])
        monkeypatch.setenv("GPT2REPRO_DOWNLOAD_BACKOFF", "0.01")
        monkeypatch.setenv("GPT2REPRO_DOWNLOAD_RETRIES", "3")
        monkeypatch.setattr(assets, "CORE_BUNDLE_SHA256", "0" * 64)
        with pytest.raises(
            assets.AssetError, match="gave up after 3 tries .*sha256 mismatch: expected 0{64}, got"
        ):
            assets.fetch_core_bundle()
        assert not (assets.cache_dir() / "core_eval_bundle").exists()
        monkeypatch.setattr(assets, "CORE_BUNDLE_SHA256", None)
        hub.faults = Faults(plan=["503", "reset"])
        root = assets.fetch_core_bundle()
    assert dict(hub.faults.injected) == {"503": 1, "reset": 1}
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["source"] == url and set(manifest["files"]) == {
        "core.yaml",
        "eval_meta_data.csv",
        "eval_data/fx/hs0.jsonl",
    }
    assert core_data.load_bundle().tasks[0].items  # the cached copy, checked against its manifest
    (root / "core.yaml").write_text((root / "core.yaml").read_text() + "\n")
    with pytest.raises(assets.AssetError, match="core.yaml: sha256 mismatch"):
        core_data.load_bundle()


@pytest.mark.parametrize(
    "row, message",
    [
        ({"query": "q", "choices": ["a"], "gold": 1}, "field 'gold' must be an index"),
        ({"query": "q", "choices": "ab", "gold": 0}, "field 'choices' must be strings"),
        ("not an object", "expected a JSON object"),
    ],
)
def test_malformed_item_names_file_and_line(tmp_path, row, message):
    root = write_bundle(tmp_path / "b", TASKS[:1], extra_rows={"hs0": [row]})
    with pytest.raises(core_data.CoreError, match=f"hs0.jsonl:5: {message}"):
        core_data.load_bundle(root)


def test_hostile_bundle_files_are_one_line(tmp_path):
    """Nesting too deep for Python's parser, bytes that are not UTF-8, a baseline of 100% (centered
    accuracy would divide by zero): each one line naming the file, never a traceback."""
    root = write_bundle(tmp_path / "deep", TASKS[:1])
    with open(root / "eval_data" / "fx" / "hs0.jsonl", "a") as f:
        f.write("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(core_data.CoreError, match="hs0.jsonl:5: not valid JSON"):
        core_data.load_bundle(root)
    root = write_bundle(tmp_path / "latin", TASKS[:1])
    (root / "eval_data" / "fx" / "hs0.jsonl").write_bytes(b'{"query": "caf\xe9"}\n')
    with pytest.raises(core_data.CoreError, match="hs0.jsonl: not UTF-8 text"):
        core_data.load_bundle(root)
    certain = [("hs0", "multiple_choice", 0, " ", 100.0, lambda: hellaswag_rows(4))]
    with pytest.raises(core_data.CoreError, match="a random baseline must be in"):
        core_data.load_bundle(write_bundle(tmp_path / "certain", certain))


def test_an_item_that_cannot_be_scored_stops_every_rank(monkeypatch):
    """A rank whose share holds no bad item still raises (after the one all-reduce every rank
    reaches), instead of going on into a collective the failing rank never joins."""
    from gpt2repro.evals import core
    from gpt2repro.parallel import distributed

    task = core_data.Task("t", "language_modeling", 0, " ", 0.0)
    task.items = [{"context": "a", "continuation": "b"}] * 2
    calls = []

    def prepare(task, index, block_size, enc):
        if index == 0:  # rank 0's item
            raise core_data.CoreError("item 0 does not fit")

    monkeypatch.setattr(core, "prepare", prepare)
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda v, d: calls.append(v) or [1.0])  # rank 0 failed
    with pytest.raises(core_data.CoreError, match="another rank names it"):
        core.prepare_share([task], 64, rank=1, world_size=2)  # rank 1 holds item 1, which is fine
    assert calls == [[0.0]]


def test_cli_prints_the_table_with_gpt2_references(models, bundle_dir, tmp_path, capsys):
    out, preds = tmp_path / "core.json", tmp_path / "preds.jsonl"
    argv = ["eval", "core", "--hf", str(models[2]), "--bundle", str(bundle_dir), "--device", "cpu"]
    assert main([*argv, "--tasks", "hs0,lm1", "--json", str(out), "--predictions", str(preds)]) == 0
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert list(result["tasks"]) == ["hs0", "lm1"]
    assert result["core"] == pytest.approx(
        (result["tasks"]["hs0"]["centered"] + result["tasks"]["lm1"]["centered"]) / 2
    )
    assert "GPT-2 124M 0.1139" in text and "1.5B 0.2565" in text and "hs0" in text
    assert len(preds.read_text().splitlines()) == 9


@pytest.mark.slow
def test_two_ranks_give_the_single_process_results(models, bundle_dir, tmp_path):
    """Under torchrun the items are sharded and the counts summed: the same JSON as one process,
    and every rank's predictions in the file."""
    from helpers import run_to_end

    common = ["eval", "core", "--hf", str(models[2]), "--bundle", str(bundle_dir), "--device", "cpu"]
    outs = {}
    for nproc in (None, 2):  # the one process in this one (run_to_end): a start-up less
        out = tmp_path / f"{nproc}.json"
        run_to_end([*common, "--json", out, "--predictions", tmp_path / f"{nproc}.jsonl"], nproc=nproc)
        outs[nproc] = json.loads(out.read_text())
    assert outs[None]["tasks"] == outs[2]["tasks"] and outs[None]["core"] == outs[2]["core"]
    rows = [json.loads(line) for line in (tmp_path / "2.jsonl").read_text().splitlines()]
    assert len(rows) == sum(r["n"] for r in outs[2]["tasks"].values())


def learnable_bundle(root):
    return write_bundle(root, [("learn", "multiple_choice", 0, " ", 50.0, lambda: learnable_rows(12))])


def slow_core(monkeypatch, seconds: float) -> None:
    """Every CORE evaluation takes `seconds` longer, as a real one would."""
    import time

    evaluate = core.Suite.evaluate
    monkeypatch.setattr(core.Suite, "evaluate", lambda *a, **k: (time.sleep(seconds), evaluate(*a, **k))[1])


def check_target(run, target, free_dt):
    """The run stopped at the first step whose CORE reached `target` and saved it; the recorded time
    is the steps' training time (the train events' dt), none of the evaluations'."""
    from helpers import events

    from gpt2repro.checkpoint import ckptdir

    cores = {e["step"]: e["core"] for e in events(run, "core")}
    (hit,) = events(run, "target")
    k = hit["step"]
    assert hit["core"] == cores[k] >= target and all(cores[s] < target for s in cores if s < k)
    assert max(cores) == k > 0 and ckptdir.latest(run).name == f"step_{k:08d}"
    dts = {e["step"]: e["dt"] for e in events(run, "train")}
    assert sorted(dts) == list(range(k))
    assert sum(dts.values()) <= hit["seconds"] < sum(dts.values()) + free_dt
    return k


def test_target_core_stops_at_the_step_reached_timing_training_only(data_dir, tmp_path, monkeypatch):
    from helpers import small_cfg

    from gpt2repro.training import train as tr

    slow_core(monkeypatch, 0.5)
    bundle = learnable_bundle(tmp_path / "bundle")
    cfg = small_cfg(
        "max_steps=12", "core_every=1", f"core_bundle={bundle}", "target_core=0.5", "ckpt_every=100"
    )
    summary = tr.train(cfg, data_dir, tmp_path / "run")
    k = check_target(tmp_path / "run", 0.5, free_dt=0.5)
    assert summary["step"] == k and summary["core"] >= 0.5
    pytest.importorskip("matplotlib")
    from gpt2repro.training.plot import plot_run

    png = plot_run(tmp_path / "run").read_bytes()
    assert int.from_bytes(png[16:20], "big") == 2100  # a third panel (7 inches at 100 dpi): CORE


def test_time_to_target_core_is_kept_across_a_resume(data_dir, tmp_path, monkeypatch):
    """Preempted after the first step, resumed: the time to the target counts both processes'
    training steps (the clock is in the checkpoint), and still no evaluation."""
    from helpers import small_cfg, stop_after

    from gpt2repro.training import train as tr

    slow_core(monkeypatch, 0.5)
    bundle = learnable_bundle(tmp_path / "bundle")
    cfg = small_cfg(
        "max_steps=12", "core_every=1", f"core_bundle={bundle}", "target_core=0.5", "ckpt_every=100"
    )
    with monkeypatch.context() as m:
        stop_after(m, 1)
        assert tr.train(cfg, data_dir, tmp_path / "run")["step"] == 1
    tr.train(cfg, data_dir, tmp_path / "run")
    assert check_target(tmp_path / "run", 0.5, free_dt=0.5) > 1


def test_two_ranks_recording_one_bundle_do_not_list_each_others_temporaries(tmp_path):
    """Ranks loading a bundle that has no manifest yet each record it; one rank's manifest, half
    written under its temporary name, is not a file of the bundle for the other (which would list
    it, and every later load would find it missing)."""
    root = write_bundle(tmp_path / "b", TASKS[:1])
    (root / f".{assets.BUNDLE_MANIFEST}.3f9a1c.tmp").write_text('{"source": ')  # the other rank's
    files = assets.record_bundle(root, str(root))
    assert sorted(files) == ["core.yaml", "eval_data/fx/hs0.jsonl", "eval_meta_data.csv"]
    (root / f".{assets.BUNDLE_MANIFEST}.3f9a1c.tmp").unlink()  # it published
    assert core_data.load_bundle(root)


def test_a_bundle_without_tasks_is_one_line_before_any_evaluation_or_training_step(
    models, data_dir, tmp_path, capsys
):
    """CORE is a mean over the tasks: none is a one-line error where the bundle is read, for `eval
    core` and for a run with core_every before its first step (not a ZeroDivisionError later)."""
    from helpers import SMALL, assert_one_line_error, events, train_argv

    bundle = write_bundle(tmp_path / "bundle", tasks=TASKS[:1])
    (bundle / "core.yaml").write_text("icl_tasks: []\n")
    fragment = "core.yaml: icl_tasks is empty"
    assert_one_line_error(capsys, ["eval", "core", "--hf", models[2], "--bundle", bundle], fragment)
    run = tmp_path / "run"
    argv = [
        *train_argv(data_dir, *SMALL, "max_steps=4", "core_every=2", f"core_bundle={bundle}"),
        "--out",
        run,
    ]
    assert_one_line_error(capsys, argv, fragment)
    assert not (run / "metrics.jsonl").exists() or not events(run, "train")
