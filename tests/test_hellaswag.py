"""HellaSwag scoring against an independent one-example-at-a-time float64 reference, both styles."""

import copy
import gzip
import json
import os
import subprocess

import pytest
import torch
import torch.nn.functional as F
from helpers import command, run_to_end, subprocess_env

from conftest import ROOT, shared_file
from gpt2repro.evals import hellaswag as hs
from gpt2repro.model.gpt import GPT

FIXTURE = [
    {
        "ind": 0,
        "activity_label": "Baking cookies",
        "ctx_a": "A woman is in a kitchen.",
        "ctx_b": "she",
        "ctx": "A woman is in a kitchen. she",
        "label": 2,
        "split": "val",
        "split_type": "indomain",
        "source_id": "x",
        "endings": [
            "mixes flour and sugar [title] in a bowl.",
            "jumps over the moon.",
            "puts the tray in the oven.",
            "reads  a  book   quietly.",
        ],
    },
    {
        "ind": 1,
        "activity_label": "Home and Garden",
        "ctx_a": "[header] How to water plants [title] Check the soil.",
        "ctx_b": "",
        "ctx": "[header] How to water plants [title] Check the soil.",
        "label": 0,
        "split": "val",
        "split_type": "zeroshot",
        "source_id": "y",
        "endings": [
            "[step] Water when dry.",
            "Plants sing.",
            "The soil is a car.",
            "Nothing happens [substeps] ever.",
        ],
    },
    {
        "ind": 2,
        "activity_label": "Running",
        "ctx_a": "A man runs on a track  quickly.",
        "ctx_b": "then he",
        "ctx": "A man runs on a track  quickly. then he",
        "label": 3,
        "split": "val",
        "split_type": "indomain",
        "source_id": "z",
        "endings": ["stops.", "flies away into the sky.", "eats.", "crosses the finish line."],
    },
]


def reference_sums(model64: GPT, example: dict, style: str, enc) -> tuple[list[float], list[float]]:
    """Each ending scored alone, in float64: the summed log-probability of its tokens, and the norms."""
    if style == "completion":
        ctx = enc.encode(example["ctx"])
        ends = [enc.encode(" " + e) for e in example["endings"]]
        norms = [len(e) for e in ends]
    else:

        def clean(t):
            import re

            t = t.strip().replace(" [title]", ". ")
            t = re.sub(r"\[.*?\]", "", t)
            return t.replace("  ", " ")

        query = clean(
            example["activity_label"] + ": " + example["ctx_a"] + " " + example["ctx_b"].capitalize()
        )
        ctx = enc.encode(query.rstrip())
        moved = query[len(query.rstrip()) :]
        ends = [enc.encode(query.rstrip() + moved + " " + clean(e))[len(ctx) :] for e in example["endings"]]
        norms = [len(clean(e)) for e in example["endings"]]
    sums = []
    for end in ends:
        tokens = torch.tensor([ctx + end])
        with torch.no_grad():
            logp = F.log_softmax(model64(tokens)[0][0], dim=-1)
        sums.append(sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(end)))
    return sums, norms


@pytest.fixture(scope="module")
def model(tiny_config):
    torch.manual_seed(3)
    return GPT(tiny_config).eval()


@pytest.fixture(scope="module")
def fixture_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hs") / "hs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in FIXTURE))
    return path


@pytest.mark.parametrize("style", hs.STYLES)
def test_matches_float64_reference(model, fixture_file, enc, style):
    examples = hs.load_examples(fixture_file)
    model64 = copy.deepcopy(model).double()
    details = []
    hs.evaluate(model64, examples, style, batch_size=2, details=details)
    details32 = []
    result = hs.evaluate(model, examples, style, batch_size=3, details=details32)
    correct = correct_norm = 0
    for d, d32, ex in zip(details, details32, examples):
        sums, norms = reference_sums(model64, ex, style, enc)
        assert d["logprob_sums"] == pytest.approx(sums, abs=1e-6)
        assert d32["logprob_sums"] == pytest.approx(sums, abs=1e-3)  # fp32 vs fp64
        pred = max(range(4), key=lambda i: sums[i])
        pred_norm = max(range(4), key=lambda i: sums[i] / norms[i])
        assert (d["pred"], d["pred_norm"]) == (d32["pred"], d32["pred_norm"]) == (pred, pred_norm)
        correct += pred == ex["label"]
        correct_norm += pred_norm == ex["label"]
    assert result == {"style": style, "n": 3, "acc": correct / 3, "acc_norm": correct_norm / 3}


def test_bf16_autocast_tracks_the_float64_reference(model, fixture_file, enc):
    """bf16 keeps 8 significant bits, so each summed log-probability may move by a few 2^-8 parts of
    itself; the scores must differ from fp32 (autocast is really on) but stay that close."""
    examples = hs.load_examples(fixture_file)
    model64 = copy.deepcopy(model).double()
    bf16, fp32 = [], []
    hs.evaluate(model, examples, "completion", batch_size=2, dtype="bf16", details=bf16)
    hs.evaluate(model, examples, "completion", batch_size=2, details=fp32)
    assert [d["logprob_sums"] for d in bf16] != [d["logprob_sums"] for d in fp32]
    for d, ex in zip(bf16, examples):
        sums, _ = reference_sums(model64, ex, "completion", enc)
        assert d["logprob_sums"] == pytest.approx(sums, rel=2**-6)


def test_prerendered_examples_are_not_tokenized_again(model, fixture_file, enc, monkeypatch):
    """The training loop renders its examples once; evaluating those gives what rendering anew gives,
    on each rank's share."""
    examples = hs.load_examples(fixture_file)
    for style in hs.STYLES:
        rendered = [hs.render(e, style, enc) for e in examples]
        fresh, again = [], []
        expected = hs.evaluate(model, examples, style, rank=1, world_size=2, details=fresh)
        with monkeypatch.context() as m:
            m.setattr(hs, "render", lambda *a: pytest.fail("rendered again"))
            got = hs.evaluate(model, examples, style, rank=1, world_size=2, details=again, rendered=rendered)
        assert got == expected and again == fresh and [d["index"] for d in again] == [1]
    with pytest.raises(ValueError, match="2 rendered examples for 3 examples"):
        hs.evaluate(model, examples, "completion", rendered=rendered[:2])


def test_preprocess_and_harness_pair(enc):
    assert (
        hs.preprocess(" Intro [title] Make tea.  [step] Boil  water. ") == "Intro. Make tea.  Boil water."
    )  # one pass, as lm-eval
    ctx, cont = hs.harness_pair(enc, "Context ends with space ", "word")
    assert enc.decode(ctx) == "Context ends with space" and enc.decode(cont) == " word"
    r = hs.render(FIXTURE[0], "harness", enc)
    assert enc.decode(r.context) == "Baking cookies: A woman is in a kitchen. She"
    assert r.norms[0] == len("mixes flour and sugar. in a bowl.")
    r = hs.render(FIXTURE[0], "completion", enc)
    assert enc.decode(r.endings[1]) == " jumps over the moon." and r.norms[1] == len(r.endings[1])


@pytest.mark.slow
def test_batched_equals_one_at_a_time_on_real_examples(enc):
    from gpt2repro.interop.hf import load_hf

    shared_file("hellaswag_val.jsonl.gz")
    model = load_hf(shared_file("tiny-gpt2")).eval()
    examples = hs.load_examples(limit=48)  # contexts and endings of many lengths: padding is exercised
    assert len(examples) == 48
    for style in hs.STYLES:
        batched, single = [], []
        hs.evaluate(model, examples, style, batch_size=32, details=batched)
        for ex in examples:
            hs.evaluate(model, [ex], style, batch_size=1, details=single)
        assert [(d["pred"], d["pred_norm"]) for d in batched] == [(d["pred"], d["pred_norm"]) for d in single]
        for a, b in zip(batched, single):
            assert a["logprob_sums"] == pytest.approx(b["logprob_sums"], abs=1e-4)


def test_official_file_has_10042_rows():
    shared_file("hellaswag_val.jsonl.gz")
    examples = hs.load_examples()
    assert len(examples) == 10042 and sum(e["label"] == 0 for e in examples) > 2000


def test_long_rows_are_left_truncated_to_block_size(tiny_config, enc):
    from gpt2repro.config.schema import model_config

    torch.manual_seed(0)
    short = GPT(model_config("tiny", block_size=16)).eval()
    ex = dict(FIXTURE[0], ctx="word " * 40)
    result = hs.evaluate(short, [ex], "completion")
    assert result["n"] == 1
    tokens, first = hs.row_tokens(hs.render(ex, "completion", enc), 0, 16)
    assert len(tokens) == 16 and tokens[first:] == hs.render(ex, "completion", enc).endings[0]


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", "line 2: not valid JSON"),
        (json.dumps({k: v for k, v in FIXTURE[0].items() if k != "ctx"}), "line 2: missing field"),
        (
            json.dumps(dict(FIXTURE[0], endings=["a", "b", "c"])),
            "line 2: 'endings' must be a list of 4 non-empty strings",
        ),
        (json.dumps(dict(FIXTURE[0], label=4)), "line 2: 'label' must be an integer 0-3"),
        (json.dumps(dict(FIXTURE[0], label="1")), "line 2: 'label' must be an integer 0-3"),
        ("[1, 2]", "line 2: expected a JSON object"),
        (
            json.dumps(dict(FIXTURE[0], endings=["a", "b", "c", " "])),
            "line 2: 'endings' must be a list of 4 non-empty strings",
        ),
        (  # JSON's "\ud800" escape: a lone surrogate, no text a tokenizer can encode
            json.dumps(dict(FIXTURE[0], endings=["ok.", "aw\ud800ay.", "c", "d"])),
            "line 2: field endings\\[1\\] is not valid Unicode text",
        ),
        (json.dumps(dict(FIXTURE[0], ctx="\udfff then")), "line 2: field ctx is not valid Unicode text"),
    ],
)
def test_malformed_rows_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(FIXTURE[0]) + "\n" + line + "\n")
    with pytest.raises(hs.HellaSwagError, match=f"bad.jsonl:{message.replace('line ', '')}"):
        hs.load_examples(path)


def test_empty_inputs_and_bad_counts_are_refused(tmp_path, model):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(hs.HellaSwagError, match="empty.jsonl: no examples"):
        hs.load_examples(tmp_path / "empty.jsonl")
    (tmp_path / "one.jsonl").write_text(json.dumps(FIXTURE[0]) + "\n")
    for limit in (0, -1):
        with pytest.raises(
            hs.HellaSwagError, match=f"limit must be a positive number of examples.*got {limit}"
        ):
            hs.load_examples(tmp_path / "one.jsonl", limit)
    examples = hs.load_examples(tmp_path / "one.jsonl", 5)
    for batch_size in (0, -2):
        with pytest.raises(
            hs.HellaSwagError, match=f"batch size must be a positive number.*got {batch_size}"
        ):
            hs.evaluate(model, examples, batch_size=batch_size)
    with pytest.raises(hs.HellaSwagError, match="no examples to evaluate"):
        hs.evaluate(model, [])


def test_gzip_input_and_missing_file(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    path.write_bytes(gzip.compress((json.dumps(FIXTURE[1]) + "\n").encode()))
    assert hs.load_examples(path)[0]["ind"] == 1
    with pytest.raises(hs.HellaSwagError, match="no such file"):
        hs.load_examples(tmp_path / "none.jsonl")


def run_cli(*args, nproc=None, env=None):
    return subprocess.run(
        command(*args, nproc=nproc),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=subprocess_env(**(env or {})),
    )


@pytest.mark.slow
def test_two_rank_gloo_equals_single_process(tmp_path):
    tiny = shared_file("tiny-gpt2")
    shared_file("hellaswag_val.jsonl.gz")
    common = ["eval", "hellaswag", "--hf", str(tiny), "--limit", "41", "--style", "both", "--device", "cpu"]
    # the one process runs in this one (run_to_end: it must exit 0), a Python and torch start-up less
    one = run_to_end([*common, "--json", tmp_path / "one.json", "--predictions", tmp_path / "p1.jsonl"])
    two = run_cli(
        *common, "--json", str(tmp_path / "two.json"), "--predictions", str(tmp_path / "p2.jsonl"), nproc=2
    )
    assert two.returncode == 0, two.stderr
    r1, r2 = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert r1 == r2 and r1["completion"]["n"] == 41
    assert "hellaswag [harness] n=41" in one
    # every rank's predictions, in index order per style: the single process's file
    p1, p2 = (
        [json.loads(line) for line in (tmp_path / p).read_text().splitlines()]
        for p in ("p1.jsonl", "p2.jsonl")
    )
    assert [(r["style"], r["index"]) for r in p2] == [
        (s, i) for s in ("completion", "harness") for i in range(41)
    ]
    for a, b in zip(p1, p2):
        assert {**a, "logprob_sums": 0, "norm_scores": 0} == {**b, "logprob_sums": 0, "norm_scores": 0}
        assert a["logprob_sums"] == pytest.approx(b["logprob_sums"], rel=1e-5)


@pytest.mark.skipif(
    not os.environ.get("GPT2REPRO_GPT2_DIR"),
    reason="needs real GPT-2 124M weights: set GPT2REPRO_GPT2_DIR to a local HF gpt2 directory (the hub is unreachable here)",
)
def test_real_gpt2_scores_the_published_number():
    from gpt2repro.interop.hf import load_hf

    model = load_hf(os.environ["GPT2REPRO_GPT2_DIR"]).eval()
    result = hs.evaluate(model, hs.load_examples(), "completion", batch_size=32)
    assert result["n"] == 10042 and result["acc_norm"] == pytest.approx(0.2955, abs=0.001)
