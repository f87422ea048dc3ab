"""Our table of hostile input (issue #28's classes, each case real): every command meets malformed
files, values of the wrong JSON type in every reader, special-token text in prompts, arguments torch
would refuse late and paths that verify nothing. Each refused case ends in exactly one line
(`gpt2repro: error: …`, exit 2) naming the problem; each accepted case (a BOM, Alpaca's JSON
array, a checkpoint directory given to `verify`) succeeds. The symbolic-link cases are in
test_symlinks.py, random values in every field in test_property.py."""

import gzip
import json
import re
import shutil

import pytest
from helpers import HELLASWAG_ROW, SMALL, assert_one_line_error, run_main

from conftest import CHAT_SMALL, GREETING, shared_file

TINY = shared_file("tiny-gpt2")
BOM = b"\xef\xbb\xbf"
HI = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
ROW = HELLASWAG_ROW
DEEP = "[" * 100_000 + "]" * 100_000


def _lines(*records) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()


def _truncated_gzip(data: bytes) -> bytes:
    packed = gzip.compress(data)
    return packed[: len(packed) - 30]


def _turns(key, speaker, text, first, second) -> dict:
    return {key: [{speaker: first, text: "Hi"}, {speaker: second, text: "Hello."}]}


def _hellaswag(**changes) -> bytes:
    return _lines({**ROW, **changes})


FILES = {
    # config files
    "deep.json": '{"preset": "cpu-tiny", "seed": ' + DEEP + "}",
    "deep.toml": 'preset = "cpu-tiny"\nseed = ' + DEEP + "\n",
    "bom.json": BOM + b'{"preset": "cpu-tiny", "max_steps": [[1]]}',
    "bom.toml": BOM + b'preset = "cpu-tiny"\nmax_steps = 7\n',
    "surrogate.json": '{"preset": "cpu-tiny", "sample_prompt": "\\ud800"}',
    "preset-list.json": '{"preset": ["cpu-tiny"]}',
    "model-list.json": '{"preset": "cpu-tiny", "model": [1, 2]}',
    "layer-object.json": '{"preset": "cpu-tiny", "model": {"n_layer": {"n": 4}}}',
    "seed-nested.json": '{"preset": "cpu-tiny", "seed": [[[[[[1]]]]]]}',
    "string.json": '"cpu-tiny"',
    "nan.json": '{"preset": "cpu-tiny", "max_lr": NaN}',
    "prompt-eot.toml": 'preset = "cpu-tiny"\nsample_every = 1\nsample_prompt = "<|endoftext|>Once"\n',
    "long-device.toml": 'preset = "cpu-tiny"\ndevice = "' + "x" * 500 + '"\n',
    # prepare: documents
    "deep-doc.jsonl": '{"text": ' + DEEP + "}\n",
    "records.json": b'[{"text": "one"}, {"text": 2}]',
    "docs.json": json.dumps([{"text": f"document {i} " * 20} for i in range(40)]),
    "cut.json": '[{"text": "one"}, {"te',
    "number.jsonl": _lines({"text": 5}),
    "missing.jsonl": _lines({"title": "x"}),
    "list-row.jsonl": _lines([1, 2]),
    "latin1.jsonl": b'{"text": "caf\xe9"}\n',
    "blank.jsonl": "\n \n\n",
    "docs.jsonl": _lines(*[{"text": f"document {i} " * 20} for i in range(40)]),
    "trunc.jsonl.gz": _truncated_gzip(_lines(*[{"text": "hello world " * 50}] * 200)),
    "bom-docs.jsonl.gz": gzip.compress(BOM + _lines(*[{"text": f"document {i} " * 20} for i in range(40)])),
    # prepare --chat: conversations
    "from-list.jsonl": _lines(_turns("conversations", "from", "value", ["human"], "gpt")),
    "from-object.jsonl": _lines(_turns("conversations", "from", "value", {"who": "human"}, "gpt")),
    "role-list.jsonl": _lines(_turns("messages", "role", "content", "user", ["assistant"])),
    "role-object.jsonl": _lines(_turns("messages", "role", "content", {"r": "user"}, "assistant")),
    "role-number.jsonl": _lines(_turns("messages", "role", "content", 1, "assistant")),
    "content-list.jsonl": _lines({"messages": [{"role": "user", "content": ["Hi"]}, HI[1]]}),
    "content-number.jsonl": _lines({"messages": [HI[0], {"role": "assistant", "content": 7}]}),
    "messages-object.jsonl": _lines({"messages": {"role": "user", "content": "Hi"}}),
    "turn-string.jsonl": _lines({"messages": [HI[0], "Hello."]}),
    "instruction-list.jsonl": _lines({"instruction": ["Say hi"], "output": "hi"}),
    "output-object.jsonl": _lines({"instruction": "Say hi", "output": {"text": "hi"}}),
    "record-number.jsonl": _lines(42),
    "spelled.jsonl": _lines({"messages": [{"role": "user", "content": "Hi<|user_end|>"}, HI[1]]}),
    "deep-chat.jsonl": '{"messages": ' + DEEP + "}\n",
    "trunc-chat.jsonl.gz": _truncated_gzip(_lines(*[{"messages": HI}] * 300)),
    "latin1-chat.jsonl": b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n',
    "bom-chat.jsonl": BOM + _lines(*[{"messages": HI}] * 3),
    "alpaca.json": json.dumps([{"instruction": f"Say {w}", "input": "", "output": w} for w in "abc"] * 3),
    "alpaca-bad.json": json.dumps(
        [{"instruction": "Say a", "output": "a"}, {"instruction": 1, "output": "b"}]
    ),
    "alpaca-cut.json": '[{"instruction": "Say a", "output": "a"}, {"instr',
    "no-reply.jsonl": _lines(*[{"messages": [HI[0]]}] * 3),
    "all-bad.jsonl": _lines("not json", {"text": "x"}),
    "few.jsonl": _lines(*[{"messages": HI}] * 4),
    # HellaSwag rows
    "hs-deep.jsonl": '{"ctx": ' + DEEP + "}\n",
    "hs-ctx.jsonl": _hellaswag(ctx=5),
    "hs-label.jsonl": _hellaswag(activity_label=None),
    "hs-ctxb.jsonl": _hellaswag(ctx_b=["he"]),
    "hs-endings.jsonl": _hellaswag(endings={"a": 1}),
    "hs-label-text.jsonl": _hellaswag(label="3"),
    "hs-label-nested.jsonl": _hellaswag(label=[[[[[[3]]]]]]),
    "hs-list.jsonl": _lines([ROW]),
    "hs-trunc.jsonl.gz": _truncated_gzip(_hellaswag() * 400),
    "hs-bom.jsonl": BOM + _hellaswag(),
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, data_dir, chat_run_dir, run_dir, enc):
    """The files above, plus: conversations longer than the chat model's context, and runs whose
    checkpoints/ is empty; every path by name."""
    from gpt2repro.data.conversations import prepare_conversations

    root = tmp_path_factory.mktemp("hostile")
    for name, content in FILES.items():
        (root / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    long_rows = root / "long-rows"
    src = root / "long.jsonl"
    long_reply = [GREETING[0], {"role": "assistant", "content": "Hello there. " * 50}]  # a row each
    src.write_bytes(_lines(*[{"messages": long_reply}] * 8))
    prepare_conversations([str(src)], long_rows, seq_len=256, val_tokens=256, progress=False)
    (root / "empty-run" / "checkpoints").mkdir(parents=True)
    (root / "empty-data").mkdir()
    (root / "empty-data" / "manifest.json").write_text('{"shards": []}')
    paths = {name: str(root / name) for name in FILES}
    paths.update(
        root=str(root),
        long_rows=str(long_rows),
        data=str(data_dir),
        run=str(run_dir),
        chat_run=str(chat_run_dir),
        step=str(sorted((run_dir / "checkpoints").glob("step_*"))[-1]),
        empty_run=str(root / "empty-run"),
        empty_data=str(root / "empty-data"),
        tiny=str(TINY),
    )
    return paths


def _argv(template: list[str], paths: dict, tmp_path) -> list[str]:
    """The template with each {name} replaced by that path ({out}: a new directory)."""
    names = {**paths, "out": str(tmp_path / "out")}
    return [re.sub(r"\{([\w.\-]+)\}", lambda m: names[m[1]], a) for a in template]


def _config(name):
    return ["presets", "--config", "{" + name + "}"]


def _prepare(name, *extra):
    return ["prepare", "--source", "{" + name + "}", "--out", "{out}", *extra]


def _chat(name, *extra):
    return ["prepare", "--chat", "--source", "{" + name + "}", "--out", "{out}", "--seq-len", "64", *extra]


TRAIN = ["train", "--preset", "cpu-tiny", "--data", "{data}", "--out", "{out}", *SMALL]
SFT = [
    "train",
    "--preset",
    "cpu-tiny",
    "--data",
    "{long_rows}",
    "--out",
    "{out}",
    "model.chat=true",
    *CHAT_SMALL,
]
SFT += ["seq_len=256", "model.block_size=256", "micro_batch_size=1"]


def _hs(name):
    return ["eval", "hellaswag", "--hf", "{tiny}", "--data", "{" + name + "}", "--limit", "2"]


# fmt: off
REFUSED = [
    # config files: structure, types, encodings
    ("config nested 100k deep (JSON)", _config("deep.json"), "deep.json: not valid JSON (nested too deeply"),
    ("config nested 100k deep (TOML)", _config("deep.toml"), "deep.toml: not valid TOML: nested too deeply"),
    ("config JSON after a BOM", _config("bom.json"), "bom.json: max_steps=[[1]]: expected an integer"),
    ("config lone surrogate", _config("surrogate.json"), "sample_prompt='\\ud800': not valid Unicode text"),
    ("config preset a list", _config("preset-list.json"), "preset=['cpu-tiny']: expected a preset name"),
    ("config model a list", _config("model-list.json"), "model=[1, 2]: expected a table of architecture"),
    ("config model key an object", _config("layer-object.json"), "model.n_layer={'n': 4}: expected an integer"),
    ("config value shown short", _config("seed-nested.json"), "seed=[[[...]]]: expected an integer"),
    ("config a string", _config("string.json"), "string.json: expected an object of config keys, not str"),
    ("config NaN", _config("nan.json"), "max_lr=nan: expected a positive number"),
    ("config device 500 chars", _config("long-device.toml"), "long-device.toml:2: device='xxxxxxxxxxxxxxxxxxxxxxxxxxx...xxx"),
    # prepare: documents
    ("doc nested 100k deep", _prepare("deep-doc.jsonl"), "deep-doc.jsonl:1: not valid JSON (nested too deeply"),
    ("doc array, a number", _prepare("records.json"), "records.json: record 2 of the array: no string field"),
    ("doc array cut short", _prepare("cut.json"), "cut.json:1: not valid JSON"),
    ("doc text a number", _prepare("number.jsonl"), "number.jsonl:1: no string field 'text' ('text' is int"),
    ("doc text missing", _prepare("missing.jsonl"), "missing.jsonl:1: no string field 'text' ('text' is missing)"),
    ("doc a list", _prepare("list-row.jsonl"), "list-row.jsonl:1: a record is list, not an object"),
    ("doc not UTF-8", _prepare("latin1.jsonl"), "latin1.jsonl:1: not UTF-8 text"),
    ("doc gzip truncated", _prepare("trunc.jsonl.gz"), "the gzip stream ends early, after line"),
    ("doc nothing at all", _prepare("blank.jsonl"), "nothing prepared: the input holds no tokens"),
    ("doc all held out", _prepare("docs.jsonl"), "went to the val split (--val-tokens, by default one shard"),
    ("doc max_tokens all val", _prepare("docs.jsonl", "--val-tokens", "500", "--max-tokens", "400"), "val split"),
    ("hf-shards ~nosuchuser", ["prepare", "--source", "hf-shards:~nosuchuser/x", "--out", "{out}"], "~nosuchuser names no user's home directory"),
    # prepare --chat: conversations
    ("sharegpt from a list", _chat("from-list.jsonl"), "from-list.jsonl:1: message 0: unknown role ['human']"),
    ("sharegpt from an object", _chat("from-object.jsonl"), "message 0: unknown role {'who': 'human'}"),
    ("role a list", _chat("role-list.jsonl"), "role-list.jsonl:1: message 1: unknown role ['assistant']"),
    ("role an object", _chat("role-object.jsonl"), "message 0: unknown role {'r': 'user'}"),
    ("role a number", _chat("role-number.jsonl"), "message 0: unknown role 1"),
    ("content a list", _chat("content-list.jsonl"), "message 0 (user): content is list, not text"),
    ("content a number", _chat("content-number.jsonl"), "message 1 (assistant): content is int, not text"),
    ("messages an object", _chat("messages-object.jsonl"), "no list 'messages' (the messages layout)"),
    ("turn a string", _chat("turn-string.jsonl"), "message 1 is str, not an object with role and content"),
    ("instruction a list", _chat("instruction-list.jsonl"), "missing instruction text"),
    ("output an object", _chat("output-object.jsonl"), "message 1 (assistant): content is dict, not text"),
    ("record a number", _chat("record-number.jsonl"), "record-number.jsonl:1: a record is int, not an object"),
    ("special token typed", _chat("spelled.jsonl"), "the text contains the special token <|user_end|>"),
    ("chat nested 100k deep", _chat("deep-chat.jsonl"), "deep-chat.jsonl:1: not valid JSON (nested too deeply"),
    ("chat gzip truncated", _chat("trunc-chat.jsonl.gz"), "the gzip stream ends early"),
    ("chat not UTF-8", _chat("latin1-chat.jsonl"), "latin1-chat.jsonl: cannot read it as its extension says"),
    ("alpaca record of a bad type", _chat("alpaca-bad.json"), "alpaca-bad.json: record 2: missing instruction"),
    ("alpaca array cut short", _chat("alpaca-cut.json"), "alpaca-cut.json:1: not valid JSON"),
    ("chat no reply anywhere", _chat("no-reply.jsonl", "--val-tokens", "0"), "nothing prepared: no conversation of the 3"),
    ("chat all bad, skipped", _chat("all-bad.jsonl", "--skip-bad"), "(2 bad, 0 too long, 0 no reply; --seq-len 64)"),
    ("chat all held out", _chat("few.jsonl"), "all 1 rows of the input went to the val split"),
    # HellaSwag files
    ("hellaswag nested 100k deep", _hs("hs-deep.jsonl"), "hs-deep.jsonl:1: not valid JSON (nested too deeply"),
    ("hellaswag ctx a number", _hs("hs-ctx.jsonl"), "hs-ctx.jsonl:1: 'ctx' must be text, got int"),
    ("hellaswag label null", _hs("hs-label.jsonl"), "'activity_label' must be text, got NoneType"),
    ("hellaswag ctx_b a list", _hs("hs-ctxb.jsonl"), "'ctx_b' must be text, got list"),
    ("hellaswag endings an object", _hs("hs-endings.jsonl"), "'endings' must be a list of 4 non-empty strings"),
    ("hellaswag label text", _hs("hs-label-text.jsonl"), "'label' must be an integer 0-3, got '3'"),
    ("hellaswag label shown short", _hs("hs-label-nested.jsonl"), "got [[[...]]]"),
    ("hellaswag row a list", _hs("hs-list.jsonl"), "hs-list.jsonl:1: expected a JSON object"),
    ("hellaswag gzip truncated", _hs("hs-trunc.jsonl.gz")[:-2], "the gzip stream ends early"),
    # special-token text in prompts: refused everywhere
    ("sample prompt <|endoftext|>", ["sample", "--hf", "{tiny}", "--prompt", "<|endoftext|>Hi"], "the prompt contains the special token <|endoftext|>"),
    ("sample prompt chat token", ["sample", "--hf", "{tiny}", "--prompt", "Hi <|assistant_start|>"], "the special token <|assistant_start|>"),
    ("chat message special token", ["chat", "--checkpoint", "{chat_run}", "--message", "<|user_end|>x"], "contains the special token <|user_end|>"),
    ("train sample_prompt override", [*TRAIN, "sample_every=1", "sample_prompt=<|endoftext|>"], "the prompt contains the special token"),
    ("train sample_prompt in a file", ["train", "--config", "{prompt-eot.toml}", "--data", "{data}", "--out", "{out}", *SMALL, "sample_every=1"], "the special token <|endoftext|>"),
    ("sft sample_prompt chat token", [*SFT, "sample_every=1", "sample_prompt=<|user_end|>"], "the prompt contains the special token <|user_end|>"),
    # devices this build lacks: one line, checked before anything loads, the same in every command
    ("sample --device xpu", ["sample", "--hf", "{tiny}", "--device", "xpu"], "device='xpu': expected auto, cpu, cuda, cuda:N or mps"),
    ("chat --device xpu", ["chat", "--checkpoint", "{chat_run}", "--device", "xpu", "--message", "Hi"], "device='xpu'"),
    ("eval hellaswag --device xpu", [*_hs("hs-bom.jsonl"), "--device", "xpu"], "device='xpu'"),
    ("eval chat --device meta", ["eval", "chat", "--checkpoint", "{chat_run}", "--data", "{long_rows}", "--device", "meta"], "device='meta'"),
    ("serve --device xpu", ["serve", "--hf", "{tiny}", "--device", "xpu"], "device='xpu'"),
    ("bench --device xpu", ["bench", "generate", "--device", "xpu"], "device='xpu'"),
    ("sample --device cuda:7", ["sample", "--hf", "{tiny}", "--device", "cuda:7"], "device=cuda:7 requested but CUDA is not available"),
    ("train device=xpu", [*TRAIN, "device=xpu"], "device='xpu'"),
    # seeds torch cannot take: the seed key's range in every command
    ("sample --seed 2^64", ["sample", "--hf", "{tiny}", "--seed", str(2**64)], f"--seed {2**64}: expected an integer in [0, 2^63)"),
    ("sample --seed 2^63", ["sample", "--hf", "{tiny}", "--seed", str(2**63)], "expected an integer in [0, 2^63)"),
    ("sample --seed -1", ["sample", "--hf", "{tiny}", "--seed", "-1"], "--seed -1: expected an integer in [0, 2^63)"),
    ("chat --seed 2^63", ["chat", "--checkpoint", "{chat_run}", "--seed", str(2**63), "--message", "Hi"], "--seed 9223372036854775808"),
    ("train seed=2^63", [*TRAIN, f"seed={2**63}"], "seed=9223372036854775808: expected"),
    # rows longer than the model reads
    ("eval chat rows > context", ["eval", "chat", "--checkpoint", "{chat_run}", "--data", "{long_rows}"], "holds rows of 256 tokens; this model reads at most 128 (model.block_size): prepare the conversations again with --seq-len 128"),
    # verify with nothing verified
    ("verify empty checkpoints/", ["verify", "{empty_run}"], "empty-run: nothing to verify (0 checkpoints found)"),
    ("verify empty manifest", ["verify", "{empty_data}"], "empty-data: nothing to verify (0 shards found)"),
    ("verify a plain directory", ["verify", "{root}"], "neither a prepared data directory"),
]
# fmt: on


@pytest.mark.parametrize("template,fragment", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_in_one_line(hostile, tmp_path, capsys, template, fragment):
    assert_one_line_error(capsys, _argv(template, hostile, tmp_path), fragment)


# fmt: off
ACCEPTED = [
    ("config TOML after a BOM", _config("bom.toml"), "max_steps = 7"),
    ("doc JSON array", _prepare("docs.json", "--val-tokens", "100"), "from 40 documents"),
    ("doc gzip after a BOM", _prepare("bom-docs.jsonl.gz", "--val-tokens", "100"), "from 40 documents"),
    ("chat JSONL after a BOM", _chat("bom-chat.jsonl", "--val-tokens", "0"), "3 conversations in 1 rows"),
    ("alpaca JSON array", _chat("alpaca.json", "--val-tokens", "64"), "9 conversations in 2 rows"),
    ("alpaca JSON array, --skip-bad", _chat("alpaca.json", "--val-tokens", "0", "--skip-bad"), "bad 0"),
    ("hellaswag after a BOM", _hs("hs-bom.jsonl"), "n=1 acc="),
    ("verify RUN/checkpoints/step_N", ["verify", "{step}"], "1 checkpoint verified"),
    ("verify RUN/checkpoints", ["verify", "{run}/checkpoints"], "checkpoints verified"),
]
# fmt: on


@pytest.mark.parametrize("template,fragment", [c[1:] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_accepted(hostile, tmp_path, capsys, template, fragment):
    code, out, err = run_main(capsys, *_argv(template, hostile, tmp_path))
    assert code == 0 and fragment in out, (out, err)


def test_a_conversation_without_a_reply_is_one_rule_counted(tmp_path, enc):
    """Left out whether short or truncated: no row is spent on a conversation with nothing to learn."""
    from gpt2repro.data.conversations import prepare_conversations

    asks = {"messages": [{"role": "user", "content": "Hi"}]}
    asks_long = {"messages": [{"role": "user", "content": "word " * 100}]}
    src = tmp_path / "c.jsonl"
    src.write_bytes(_lines(asks, {"messages": HI}, asks_long, {"messages": HI}))
    m = prepare_conversations([str(src)], tmp_path / "out", seq_len=32, val_tokens=0, progress=False)
    c = m["counts"]
    assert (c["records"], c["conversations"], c["no_reply"], c["too_long"], c["rows"]) == (4, 2, 2, 0, 1)


def test_a_checkpoint_given_to_verify_is_verified(run_dir, tmp_path, capsys):
    """Damaged, it fails naming the file (it was read as a data directory: a KeyError line)."""
    step = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    copy = tmp_path / step.name
    shutil.copytree(step, copy)
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    line, out = assert_one_line_error(capsys, ["verify", copy], "1 of 1 checkpoint failed verification")
    assert "model.safetensors" in out
