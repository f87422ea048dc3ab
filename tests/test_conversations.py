"""`prepare --chat`: conversations of every layout into rows with exact loss masks, packing and
truncation counted, bad records as one-line errors (or skipped and counted), resumable to the same
bytes, and the loader's masked targets."""

import json

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error

from gpt2repro.data.conversations import data_seq_len, prepare_conversations, to_messages
from gpt2repro.data.loader import DataLoader
from gpt2repro.data.prepare import PrepareError
from gpt2repro.data.shards import (
    ShardError,
    conversation_spans,
    find_shards,
    read_mask,
    read_shard,
    verify_shards,
)
from gpt2repro.evals import chat as chat_eval
from gpt2repro.files.lock import DirLock
from gpt2repro.text import chat

S, SE, U, UE, A, AE = (chat.TOKEN_IDS[t] for t in chat.CHAT_TOKENS)
EOT = 50256

RECORDS = [  # one conversation in each layout
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
        ]
    },
    {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
    {"instruction": "Add.", "input": "1 and 2", "output": "3"},
    {"instruction": "Name a color.", "context": "", "response": "Red"},
]


def expected(enc, record_index):
    """The tokens each record must give, written out by hand."""
    e = enc.encode_ordinary
    return [
        [EOT, S, *e("Be brief."), SE, U, *e("Hi"), UE, A, *e("Hello."), AE],
        [EOT, U, *e("2+2?"), UE, A, *e("4"), AE],
        [EOT, U, *e("Add.\n\n1 and 2"), UE, A, *e("3"), AE],
        [EOT, U, *e("Name a color."), UE, A, *e("Red"), AE],
    ][record_index]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def rows_of(out, split, seq_len):
    shard = find_shards(out, split)[0]
    tokens = np.asarray(read_shard(shard))
    mask = np.asarray(read_mask(shard, len(tokens)))
    assert len(tokens) % seq_len == 1 and tokens[-1] == EOT and mask[-1] == 0  # whole rows + one pad
    return tokens[:-1].reshape(-1, seq_len), mask[:-1].reshape(-1, seq_len)


def test_every_layout_gives_exact_tokens_and_masks(tmp_path, enc):
    src = write_jsonl(tmp_path / "c.jsonl", RECORDS)
    out = tmp_path / "out"
    m = prepare_conversations([str(src)], out, seq_len=16, val_tokens=0, progress=False)
    rows, masks = rows_of(out, "train", 16)
    for i in range(len(RECORDS)):
        ids = expected(enc, i)
        assert len(ids) <= 16
        row, mask = rows[i], masks[i]  # each is too long to share a 16-token row with the next
        assert row[: len(ids)].tolist() == ids and (row[len(ids) :] == EOT).all()
        start = ids.index(A) + 1  # the assistant's text and its end token, nothing else
        want = [0] * start + [1] * (len(ids) - start) + [0] * (16 - len(ids))
        assert mask.tolist() == want, i
    c = m["counts"]
    assert (c["records"], c["conversations"], c["rows"], c["bad"]) == (4, 4, 4, 0)
    assert c["trained_tokens"] == int(masks[:, 1:].sum())
    assert data_seq_len(out) == 16 and verify_shards(out) == (3, [])  # the shard, its mask and spans


def test_named_layouts_and_the_parquet_and_saved_dataset_sources(tmp_path, enc):
    pytest.importorskip("pyarrow")
    datasets = pytest.importorskip("datasets")
    sharegpt = [RECORDS[1]] * 3
    datasets.Dataset.from_list(sharegpt).to_parquet(tmp_path / "c.parquet")
    datasets.Dataset.from_list(sharegpt).save_to_disk(tmp_path / "saved")
    for source in (tmp_path / "c.parquet", tmp_path / "saved"):
        out = tmp_path / f"out-{source.name}"
        prepare_conversations([str(source)], out, layout="sharegpt", seq_len=32, val_tokens=0, progress=False)
        rows, _ = rows_of(out, "train", 32)
        ids = expected(enc, 1)
        assert rows[0, : 3 * len(ids)].tolist() == ids * 3  # packed: three whole conversations in a row
    with pytest.raises(PrepareError, match=r"c.jsonl:1: no list 'messages' \(the messages layout\)"):
        src = write_jsonl(tmp_path / "c.jsonl", [RECORDS[1]])
        prepare_conversations([str(src)], tmp_path / "x", layout="messages", seq_len=32, progress=False)


def test_packing_truncation_and_the_val_split(tmp_path, enc):
    short = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    reply_late = {"messages": [{"role": "user", "content": "x " * 40}, {"role": "assistant", "content": "y"}]}
    long_reply = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "z " * 40}]}
    src = write_jsonl(tmp_path / "c.jsonl", [short, short, long_reply, reply_late, short] * 3)
    out = tmp_path / "out"
    m = prepare_conversations([str(src)], out, seq_len=16, val_tokens=16, shard_tokens=32, progress=False)
    c = m["counts"]
    assert (c["conversations"], c["truncated"], c["too_long"]) == (12, 3, 3)  # never silently dropped
    val, val_mask = rows_of(out, "val", 16)
    ids = chat.render(short["messages"])
    assert val.shape == (1, 16) and val[0, : 2 * len(ids)].tolist() == ids * 2
    train = np.concatenate([rows_of_shard(s, 16)[0] for s in find_shards(out, "train")])
    assert len(train) == c["rows"] - 1 and (train[:, 0] == EOT).all()  # every row opens a conversation
    truncated = chat.render(long_reply["messages"])[:16]
    assert train[0].tolist() == truncated  # cut at the row's end, reply and all


def test_the_packer_records_where_each_conversation_lies(tmp_path, enc):
    """The packer's [offset, length] of every conversation, in a file beside its shard (listed with
    its sha256): each is exactly the conversation as rendered (truncated to its row), in input order,
    the ones left out absent, in both splits; eval chat reads them rather than finding the
    boundaries again. Nothing per conversation goes into the manifest every reader parses."""
    short = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    reply_late = {"messages": [{"role": "user", "content": "x " * 40}, {"role": "assistant", "content": "y"}]}
    long_reply = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "z " * 40}]}
    records = [short, long_reply, reply_late, short, short] * 3
    src = write_jsonl(tmp_path / "c.jsonl", records)
    out = tmp_path / "out"
    prepare_conversations([str(src)], out, seq_len=16, val_tokens=16, shard_tokens=32, progress=False)
    want = [chat.render(r["messages"])[:16] for r in records if r is not reply_late]  # too long: left out
    got = {}
    for split in ("val", "train"):
        got[split] = []
        for shard, spans in conversation_spans(out, split):
            tokens = np.asarray(read_shard(shard)).tolist()
            got[split] += [tokens[offset : offset + length] for offset, length in spans]
    assert got["val"] + got["train"] == want and len(got["val"]) == 1
    assert chat_eval.conversations(out, "train") == got["train"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(isinstance(v, (str, int)) for e in manifest["shards"] for v in e.values())
    assert verify_shards(out) == (3 * len(find_shards(out, "train")) + 3, [])  # spans files verified too
    spans_file = out / manifest["shards"][0]["spans"]
    spans_file.write_bytes(spans_file.read_bytes()[:-1] + b"\xff")
    _one_line_shard_error(lambda: chat_eval.conversations(out, "val"), "spans: sha256 mismatch")
    for entry in manifest["shards"]:
        entry.pop("spans", None)  # as an earlier version wrote it
    (out / "manifest.json").write_text(json.dumps(manifest))
    _one_line_shard_error(lambda: chat_eval.conversations(out), "did not record where its conversations lie")


def _one_line_shard_error(call, fragment):
    with pytest.raises(ShardError, match=fragment) as e:
        call()
    assert "\n" not in str(e.value)


def test_spans_outside_their_shard_are_one_line(tmp_path, enc):
    """A spans file that passes its checksum (rewritten with the manifest) but points past its shard."""
    from gpt2repro.files.fsio import sha256_file

    src = write_jsonl(
        tmp_path / "c.jsonl",
        [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}] * 4,
    )
    out = tmp_path / "out"
    prepare_conversations([str(src)], out, seq_len=16, val_tokens=16, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    entry = next(e for e in manifest["shards"] if e["split"] == "val" and "spans" in e)
    spans_file = out / entry["spans"]
    for data in (np.array([[0, 10_000]], dtype="<u4").tobytes(), b"\x01\x02\x03\x04"):
        spans_file.write_bytes(data)
        next(e for e in manifest["shards"] if e["file"] == entry["spans"])["sha256"] = sha256_file(spans_file)
        (out / "manifest.json").write_text(json.dumps(manifest))
        _one_line_shard_error(lambda: chat_eval.conversations(out, "val"), "not \\[offset, length\\] pairs")


def rows_of_shard(shard, seq_len):
    tokens = np.asarray(read_shard(shard))
    return tokens[:-1].reshape(-1, seq_len), np.asarray(read_mask(shard, len(tokens)))[:-1].reshape(
        -1, seq_len
    )


BAD_RECORDS = [
    ("not json", "c.jsonl:2: not valid JSON"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "c.jsonl:2: message 0: unknown role 'bot'"),
    ({"messages": [{"role": "user"}]}, "c.jsonl:2: message 0 (user): missing content"),
    ({"messages": []}, "c.jsonl:2: empty conversation"),
    (
        {"messages": [{"role": "assistant", "content": "hi"}]},
        "c.jsonl:2: message 0: an assistant turn before any user message",
    ),
    ({"text": "plain"}, "c.jsonl:2: no 'messages', 'conversations' or 'instruction' field (fields: text)"),
    ({"instruction": "do"}, "c.jsonl:2: no 'output' or 'response'"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "c.jsonl:2: message 0: unknown role 'robot'"),
]


@pytest.mark.parametrize("record,fragment", BAD_RECORDS, ids=[f for _, f in BAD_RECORDS])
def test_bad_records_are_one_line_errors_or_skipped_and_counted(capsys, tmp_path, record, fragment):
    src = tmp_path / "c.jsonl"
    bad = record if isinstance(record, str) else json.dumps(record)
    src.write_text(json.dumps(RECORDS[0]) + "\n" + bad + "\n" + json.dumps(RECORDS[1]) + "\n")
    argv = ["prepare", "--chat", "--source", src, "--out", tmp_path / "out", "--seq-len", "32"]
    assert_one_line_error(capsys, argv, fragment)
    out = tmp_path / "skipped"
    m = prepare_conversations([str(src)], out, seq_len=32, skip_bad=True, val_tokens=0, progress=False)
    c = m["counts"]
    assert (c["records"], c["conversations"], c["bad"]) == (3, 2, 1)
    assert fragment in c["first_bad"][0] and sum(c["bad_kinds"].values()) == 1


def test_cli_prepare_chat_errors(capsys, tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", RECORDS)
    base = ["prepare", "--chat", "--source", src, "--out", tmp_path / "o"]
    assert_one_line_error(capsys, [*base, "--seq-len", "1"], "seq_len must be at least 2")
    assert_one_line_error(capsys, [*base, "--shard-tokens", "8", "--seq-len", "16"], "shard_tokens must be")
    with DirLock(tmp_path / "o", "prepare"):  # one writer per data directory, conversations too
        assert_one_line_error(capsys, [*base, "--seq-len", "16"], "o is being written by gpt2repro prepare")
    txt = tmp_path / "t.txt"
    txt.write_text("hello")
    argv = ["prepare", "--chat", "--source", txt, "--out", tmp_path / "o2"]
    assert_one_line_error(capsys, argv, "t.txt: unsupported file type for conversations")
    # all 4 rows would be held out (128 by default): refused, saying how, with nothing written
    assert_one_line_error(capsys, [*base, "--seq-len", "16"], "went to the val split")
    assert [p.name for p in (tmp_path / "o").iterdir()] == []
    code = __import__("gpt2repro.cli", fromlist=["main"]).main(
        [*map(str, base), "--seq-len", "16", "--val-tokens", "16"]
    )
    assert code == 0 and "4 conversations in 4 rows of 16 tokens" in capsys.readouterr().out


def test_an_interrupted_preparation_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    from gpt2repro.data import conversations

    records = [RECORDS[i % 4] for i in range(40)] + ["broken"] + [RECORDS[0]] * 10
    src = tmp_path / "c.jsonl"
    src.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    kw = dict(seq_len=32, shard_tokens=64, val_tokens=32, skip_bad=True, progress=False)
    whole = prepare_conversations([str(src)], tmp_path / "whole", **kw)
    real_commit, calls = conversations.RowSink.commit, []

    def crash_on_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_commit(self, *args, **kwargs)

    monkeypatch.setattr(conversations.RowSink, "commit", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_conversations([str(src)], tmp_path / "resumed", **kw)
    monkeypatch.setattr(conversations.RowSink, "commit", real_commit)
    manifest = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert sum("mask" in e for e in manifest["shards"]) == 2  # two shards committed (with masks and spans)
    resumed = prepare_conversations([str(src)], tmp_path / "resumed", **kw)
    assert resumed["counts"] == whole["counts"] and resumed["shards"] == whole["shards"]
    for entry in whole["shards"]:
        assert (tmp_path / "resumed" / entry["file"]).read_bytes() == (
            tmp_path / "whole" / entry["file"]
        ).read_bytes()
    src.write_text(src.read_text() + json.dumps(RECORDS[1]) + "\n")  # a changed input is refused
    monkeypatch.setattr(conversations.RowSink, "commit", crash_on_third)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        prepare_conversations([str(src)], tmp_path / "again", **kw)
    monkeypatch.setattr(conversations.RowSink, "commit", real_commit)
    src.write_text(src.read_text() + "\n")
    with pytest.raises(PrepareError, match="changed since the interrupted preparation"):
        prepare_conversations([str(src)], tmp_path / "again", **kw)


def test_the_loader_gives_minus_one_for_targets_not_learned(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", RECORDS * 8)
    out = tmp_path / "out"
    prepare_conversations([str(src)], out, seq_len=16, val_tokens=0, progress=False)
    loader = DataLoader(out, "train", batch_size=4, seq_len=16, masks=True)
    x, y = loader.next_batch()
    rows, masks = rows_of(out, "train", 16)
    assert (x[:, 0] == EOT).all() and torch.equal(x, torch.from_numpy(rows[:4].astype(np.int64)))
    nxt = np.concatenate([rows[:4, 1:], rows[1:5, :1]], axis=1)  # the next token; the next row's first
    learned = np.concatenate([masks[:4, 1:], masks[1:5, :1]], axis=1).astype(bool)
    assert torch.equal(y, torch.from_numpy(np.where(learned, nxt.astype(np.int64), -1)))
    assert (y[:, -1] == -1).all()  # a row's last target opens the next row: never learned
    with pytest.raises(ShardError, match="holds conversations with loss masks"):
        DataLoader(out, "train", batch_size=4, seq_len=16)  # pretraining on them: refused


def test_to_messages_maps_sharegpt_roles_and_dolly_context():
    assert to_messages(
        {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "h"}]}
    ) == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "h"},
    ]
    assert to_messages({"instruction": "I", "context": "C", "response": "R"})[0]["content"] == "I\n\nC"


def test_one_writer_per_conversation_directory(tmp_path):
    from gpt2repro.files.lock import DirLock, LockError

    src = write_jsonl(tmp_path / "c.jsonl", RECORDS)
    with DirLock(tmp_path / "out", "prepare"), pytest.raises(LockError, match="is being written by"):
        prepare_conversations([str(src)], tmp_path / "out", seq_len=16, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
