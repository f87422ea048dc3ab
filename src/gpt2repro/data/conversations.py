"""Conversations into training rows: `gpt2repro prepare --chat`.

Records come from JSONL/Parquet files or a data set (hub, streamed; or save_to_disk) in one of three
layouts, detected per record or named: OpenAI-style `messages` (`role`/`content`), ShareGPT
`conversations` (`from`/`value`), and instruction/response records (Alpaca's `instruction`/`input`/
`output`, Dolly's `instruction`/`context`/`response`). Each becomes a conversation rendered by
`chat.render_with_mask`: its tokens and which of them training learns.

Rows are `seq_len` tokens. Whole conversations are packed into a row in input order while they fit;
the rest of the row is padding (`<|endoftext|>`, never learned). Every row starts with a
conversation, so a conversation never continues across rows, and real tokens never see padding as
context (it only comes after them). A conversation longer than `seq_len` is truncated to it (counted
as truncated), or, when that leaves no assistant token, left out (counted as too long). A shard is
whole rows plus one padding token (the loader reads B*T+1 tokens a batch); beside `train_000001.bin`,
`train_000001.mask` holds one byte per token, 1 where the token is learned, and
`train_000001.spans` where each of its conversations lies ([offset, length] in tokens, little-endian
uint32 pairs; a file, not manifest entries, so a million conversations do not weigh on every reader
of the manifest), so nothing after the packer has to find them again. The first rows, at least `val_tokens`
of them, are the `val` split: held-out conversations.

A bad record (not JSON, none of the layouts, unknown role, missing content, empty, an assistant
turn first) stops the preparation with one line naming the file and line, or with `skip_bad` is
left out and counted by kind in the manifest. After every shard the manifest records the record to
resume from and the counts so far, so an interrupted preparation resumes to the same bytes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..files.fsio import AtomicFile, WriteError, sha256_file
from ..files.lock import DirLock
from ..text.chat import ChatError, render_with_mask
from ..text.tokenizer import EOT_ID
from .records import file_records, stream_records
from .shards import SPANS_DTYPE, ShardError, ShardWriter, mask_path, shard_name, spans_path
from .sink import empty_split, finished, make_out_dir, open_manifest, refused_write, write_manifest
from .sources import PrepareError, fingerprint
from .stream import open_inputs, source_args

LAYOUTS = ("auto", "messages", "sharegpt", "instruction")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
SHAREGPT_ROLES |= {"chatgpt": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}
INSTRUCTION_INPUTS = ("input", "context")  # Alpaca, Dolly
INSTRUCTION_OUTPUTS = ("output", "response")
FIRST_BAD_KEPT = 5  # examples of skipped records kept in the manifest
COUNTS = ("records", "conversations", "truncated", "too_long", "no_reply", "bad", "rows", "trained_tokens")
DEFAULT_VAL_ROWS = 128


def _layout(row: dict, layout: str) -> str:
    if layout != "auto":
        return layout
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row:
        return "instruction"
    raise ChatError(
        f"no 'messages', 'conversations' or 'instruction' field (fields: {', '.join(map(str, row)) or 'none'})",
        "no conversation",
    )


def to_messages(row: object, layout: str = "auto") -> list[dict]:
    """A record of any layout as OpenAI-style messages (checked when rendered); a reader's
    ChatError (a line that is not JSON) is raised here, where bad records are handled."""
    if isinstance(row, ChatError):
        raise row
    if not isinstance(row, dict):
        raise ChatError(f"a record is {type(row).__name__}, not an object", "no conversation")
    kind = _layout(row, layout)
    if kind == "instruction":
        return _instruction(row)
    field = "messages" if kind == "messages" else "conversations"
    turns = row.get(field)
    if not isinstance(turns, list):
        raise ChatError(f"no list {field!r} (the {kind} layout)", "no conversation")
    if kind == "messages":
        return turns
    return [
        {"role": _sharegpt_role(t.get("from")), "content": t.get("value")} if isinstance(t, dict) else t
        for t in turns
    ]


def _sharegpt_role(name: object) -> object:
    """The role a ShareGPT `from` names; anything else (a list, an object) as it is, for
    `chat.check` to refuse by name."""
    return SHAREGPT_ROLES.get(name, name) if isinstance(name, str) else name


def _instruction(row: dict) -> list[dict]:
    instruction = row.get("instruction")
    extra = next((row[k] for k in INSTRUCTION_INPUTS if row.get(k) is not None), "")
    output = next((row[k] for k in INSTRUCTION_OUTPUTS if k in row), None)
    if not isinstance(instruction, str) or not isinstance(extra, str):
        raise ChatError("missing instruction text (the instruction layout)", "missing content")
    if output is None:
        raise ChatError("no 'output' or 'response' (the instruction layout)", "missing content")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


class Packer:
    """Conversations into rows of `seq_len` tokens: whole conversations while they fit, then
    padding; a longer one truncated to a row of its own (or left out when none of its assistant
    tokens would remain)."""

    def __init__(self, seq_len: int, counts: dict):
        self.seq_len, self.counts = seq_len, counts
        self.ids: list[int] = []
        self.mask: list[int] = []
        self.spans: list[list[int]] = []  # [offset, length] of each conversation of the row
        self.placed = {"conversations": 0, "truncated": 0}  # of the row being filled: counted with it

    def add(self, ids: list[int], mask: list[int]) -> Iterator[tuple[np.ndarray, np.ndarray, list]]:
        """Place a conversation; yields the row it closes first, if any. One rule for what has
        nothing to learn: left out and counted, as `no_reply` (no assistant turn at all) or
        `too_long` (truncation cut off every assistant token)."""
        if not any(mask):
            self.counts["no_reply"] += 1
            return
        truncated = len(ids) > self.seq_len
        if truncated:
            ids, mask = ids[: self.seq_len], mask[: self.seq_len]
            if not any(mask[1:]):  # the first token is never a target within its row
                self.counts["too_long"] += 1
                return
        if len(self.ids) + len(ids) > self.seq_len:
            yield self.flush()
        self.placed["truncated"] += truncated
        self.placed["conversations"] += 1
        self.spans.append([len(self.ids), len(ids)])
        self.ids += ids
        self.mask += mask

    def flush(self) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
        """The row being filled, padded, and where its conversations lie; its counts join the totals."""
        pad = self.seq_len - len(self.ids)
        row = np.array(self.ids + [EOT_ID] * pad, dtype=np.uint16)
        mask = np.array(self.mask + [0] * pad, dtype=np.uint8)
        for key, n in self.placed.items():
            self.counts[key] += n
        self.counts["rows"] += 1
        self.counts["trained_tokens"] += int(mask[1:].sum())
        spans, self.ids, self.mask, self.spans = self.spans, [], [], []
        self.placed = dict.fromkeys(self.placed, 0)
        return row, mask, spans

    @property
    def pending(self) -> bool:
        return bool(self.ids)


class RowSink:
    """Rows into shards with their masks: the val split first (whole rows, at least `val_rows`),
    then train; each shard committed with the record to resume from and the counts so far."""

    def __init__(self, out: Path, manifest: dict, rows_per_shard: int, val_rows: int, max_rows: int | None):
        self.out, self.manifest = out, manifest
        self.rows_per_shard, self.val_rows, self.max_rows = rows_per_shard, val_rows, max_rows
        self.rows = manifest["counts"]["rows"]  # rows committed
        self.shard: tuple[ShardWriter, AtomicFile] | None = None
        self.split, self.target, self.in_shard = "", 0, 0
        self.spans: list[list[int]] = []  # the shard's conversations: [offset, length] in tokens

    @property
    def done(self) -> bool:
        return self.max_rows is not None and self.rows + self.in_shard >= self.max_rows

    def _open(self) -> None:
        self.split = "val" if self.rows < self.val_rows else "train"
        size = (
            min(self.rows_per_shard, self.val_rows - self.rows)
            if self.split == "val"
            else self.rows_per_shard
        )
        self.target = min(size, self.max_rows - self.rows) if self.max_rows else size
        path = self.out / shard_name(self.split, shards_written(self.manifest))
        self.shard, self.in_shard, self.spans = (ShardWriter(path), AtomicFile(mask_path(path))), 0, []

    def write(self, row: np.ndarray, mask: np.ndarray, spans: list[list[int]]) -> bool:
        """Append a row and its conversations' spans; whether that filled the shard (the caller then
        commits it)."""
        if self.shard is None:
            self._open()
        tokens, masks = self.shard
        self.spans += [[self.in_shard * len(row) + offset, length] for offset, length in spans]
        tokens.write(row)
        masks.file.write(mask.tobytes())
        self.in_shard += 1
        return self.in_shard == self.target

    def commit(self, resume: dict, counts: dict, final: bool = False) -> None:
        """Commit the shard, ended by one padding token (the last batch's extra target); the manifest
        then says where the input resumes and holds the counts up to there."""
        if self.shard is not None:
            tokens, masks = self.shard
            tokens.write(np.array([EOT_ID], dtype=np.uint16))
            masks.file.write(b"\0")
            spans = AtomicFile(spans_path(tokens.out.path), "the conversations' spans")
            spans.file.write(np.asarray(self.spans, dtype=SPANS_DTYPE).tobytes())
            path, mpath, spath = tokens.commit(), masks.commit(), spans.commit()
            entry = {"split": self.split, "tokens": tokens.count}
            self.manifest["shards"] += [
                {"file": path.name, **entry, "sha256": sha256_file(path), "mask": mpath.name}
                | {"spans": spath.name},
                *({"file": p.name, **entry, "sha256": sha256_file(p)} for p in (mpath, spath)),
            ]
            self.manifest["total_tokens"] += tokens.count
            self.rows += self.in_shard
            self.shard, self.in_shard = None, 0
        self.manifest.update(next=resume, counts=counts, complete=final)
        write_manifest(self.out, self.manifest)

    def discard(self) -> None:
        if self.shard is not None:
            for part in self.shard:
                part.discard()


def _bad(counts: dict, where: str, error: ChatError, skip_bad: bool) -> None:
    """A bad record: the one-line error, or with skip_bad counted by kind (the first few kept)."""
    if not skip_bad:
        raise PrepareError(f"{where}: {error} (--skip-bad leaves such records out and counts them)")
    counts["bad"] += 1
    counts["bad_kinds"][error.kind] = counts["bad_kinds"].get(error.kind, 0) + 1
    if len(counts["first_bad"]) < FIRST_BAD_KEPT:
        counts["first_bad"].append(f"{where}: {error}")


def _pack(records: Iterator, layout: str, skip_bad: bool, packer: Packer, sink: RowSink, bar) -> None:
    """Records into rows into shards, committing each shard as it fills and the last at the end.
    A shard's resume point is the record that opens the next row: the records before it are all in
    committed rows (or counted as left out), so resuming there writes exactly the same bytes."""
    counts = packer.counts
    try:
        for where, record in records:
            if sink.done:
                break
            try:
                ids, mask = render_with_mask(to_messages(record, layout))
            except ChatError as e:
                _bad(counts, where, e, skip_bad)
            else:
                for row in packer.add(ids, mask):
                    if sink.write(*row):
                        sink.commit({"record": counts["records"]}, json.loads(json.dumps(counts)))
            counts["records"] += 1
            bar.update(1)
        if packer.pending and not sink.done:
            sink.write(*packer.flush())
        _check_splits(sink, counts)
    except BaseException:
        sink.discard()
        raise
    sink.commit({"record": counts["records"]}, counts, final=True)


def _check_splits(sink: RowSink, counts: dict) -> None:
    """Refuse, before the manifest says complete, a preparation that leaves no train rows: none at
    all (saying why each record was left out), or all of them held out for validation."""
    rows, seq_len = sink.rows + sink.in_shard, sink.manifest["seq_len"]
    if sink.manifest["complete"]:
        return
    if not rows:
        left_out = ", ".join(f"{counts[k]:,} {k.replace('_', ' ')}" for k in ("bad", "too_long", "no_reply"))
        raise PrepareError(
            f"{sink.out}: nothing prepared: no conversation of the {counts['records']:,} records has a reply "
            f"to learn that fits ({left_out}; --seq-len {seq_len})"
        )
    if rows <= sink.val_rows:
        suggest = seq_len * max(1, rows // 10) if rows > 1 else 0
        raise empty_split(sink.out, "rows", rows, f"{DEFAULT_VAL_ROWS} rows of --seq-len tokens", suggest)


def _check_args(
    layout: str, seq_len: int, shard_tokens: int, val_tokens: int | None, max_tokens: int | None
) -> None:
    if layout not in LAYOUTS:
        raise PrepareError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    checks = [("seq_len", seq_len, 2), ("shard_tokens", shard_tokens, seq_len)]
    checks += [("val_tokens", val_tokens, 0), ("max_tokens", max_tokens, seq_len)]
    for option, value, low in checks:
        if value is not None and value < low:
            raise PrepareError(f"{option} must be at least {low}, got {value}")


def _manifest(out: Path, args: dict, source: str, watched: list[Path]) -> dict:
    """`prepare`'s manifest (a resume only with the same arguments and unchanged inputs), with the
    conversation counts and the record to resume from."""
    units = {"records": "a resume point counts records: JSON lines, Parquet rows, rows of a stream"}
    manifest = open_manifest(out, args, source, [fingerprint(p) for p in watched], units)
    manifest.setdefault("counts", {**dict.fromkeys(COUNTS, 0), "bad_kinds": {}, "first_bad": []})
    manifest["counts"].setdefault("no_reply", 0)  # an earlier version's interrupted preparation
    manifest.update(format="conversations", seq_len=args["seq_len"])
    manifest["next"].setdefault("record", 0)
    return manifest


def prepare_conversations(
    sources: list[str],
    out_dir: str | os.PathLike,
    *,
    layout: str = "auto",
    seq_len: int = 1024,
    skip_bad: bool = False,
    name: str | None = None,
    split: str = "train",
    revision: str | None = None,
    shard_tokens: int = 100_000_000,
    val_tokens: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
) -> dict:
    """Conversations into rows of `seq_len` tokens with loss masks, in shards in `out_dir`; returns
    the manifest. Sources as `prepare` takes them (files, globs, directories, `hf:NAME`, a
    save_to_disk directory); the val split defaults to 128 rows of held-out conversations."""
    _check_args(layout, seq_len, shard_tokens, val_tokens, max_tokens)
    stream, paths, watched = open_inputs(sources, name, split)
    out = make_out_dir(out_dir)
    val_rows = DEFAULT_VAL_ROWS if val_tokens is None else math.ceil(val_tokens / seq_len)
    args = dict(
        chat=layout,
        **source_args(sources, stream, paths, revision),
        seq_len=seq_len,
        skip_bad=skip_bad,
        shard_tokens=shard_tokens,
        val_rows=val_rows,
        max_tokens=max_tokens,
    )
    with DirLock(out, "prepare"):  # one writer per data directory
        manifest = _manifest(out, args, stream.dataset if stream else "local", watched)
        if finished(out, manifest):
            return manifest
        skip = manifest["next"]["record"]
        records = stream_records(stream, revision, skip) if stream else file_records(paths, skip)
        max_rows = max_tokens // seq_len if max_tokens else None
        sink = RowSink(out, manifest, shard_tokens // seq_len, val_rows, max_rows)
        with tqdm(initial=skip, unit="conv", disable=not progress, desc="prepare") as bar:
            try:
                _pack(records, layout, skip_bad, Packer(seq_len, manifest["counts"]), sink, bar)
            except (OSError, WriteError) as e:  # a full or read-only disk: what is committed stays
                raise refused_write(e, out, shards_written(manifest)) from None
    return manifest


def data_seq_len(data_dir: str | os.PathLike) -> int | None:
    """The row length of conversation data (its manifest says), None for other data."""
    try:
        manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != "conversations":
        return None
    if not isinstance(manifest.get("seq_len"), int):
        raise ShardError(f"{Path(data_dir) / 'manifest.json'}: conversation data without a seq_len")
    return manifest["seq_len"]


def shards_written(manifest: dict) -> int:
    """Token shards committed (each is listed with its mask and spans files)."""
    return sum("mask" in e for e in manifest["shards"])
