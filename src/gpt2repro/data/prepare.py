"""Turn a corpus into GPT-2 token shards: `gpt2repro prepare`.

Each document becomes `<|endoftext|>` + encode_ordinary(text). Tokens fill fixed-size shards; the
first `val_tokens` form the `val` split (shard 0, as in the original), the rest `train`. After every
shard the manifest records where the next one starts (document index and offset into it), so an
interrupted run resumes from its last complete shard and writes exactly the shards an uninterrupted
run would. Memory stays bounded: documents stream in batches, and only one shard buffer is held.
"""

from __future__ import annotations

import collections
import glob
import gzip
import itertools
import json
import multiprocessing
import os
import socket
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .. import __version__, assets
from ..fsio import atomic_write_text
from ..tokenizer import EOT_ID, get_tokenizer
from .shards import shard_name, write_shard

FINEWEB_EDU = "HuggingFaceFW/fineweb-edu"
FINEWEB_TOKENS = {
    "sample-10BT": 10_000_000_000,
    "sample-100BT": 100_000_000_000,
    "sample-350BT": 350_000_000_000,
}
BATCH_DOCS = 256


class PrepareError(RuntimeError):
    """Bad source, malformed input row or an incompatible earlier run; the message says which."""


def expand_sources(sources: list[str]) -> list[Path]:
    paths: list[Path] = []
    for s in sources:
        matches = sorted(glob.glob(s)) if any(c in s for c in "*?[") else [s]
        if not matches or not all(Path(m).is_file() for m in matches):
            raise PrepareError(f"source {s!r}: no such file")
        paths.extend(Path(m) for m in matches)
    return paths


class JsonLine(NamedTuple):
    """A raw jsonl row, parsed by the tokenizer workers (JSON decoding is a third of the work)."""

    path: str
    lineno: int
    line: str
    field: str

    def text(self) -> str:
        try:
            row = json.loads(self.line)
        except json.JSONDecodeError as e:
            raise PrepareError(f"{self.path}:{self.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(self.field), str):
            raise PrepareError(f"{self.path}:{self.lineno}: no string field {self.field!r}")
        return row[self.field]


def _read_jsonl(path: Path, text_field: str) -> Iterator[JsonLine]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield JsonLine(str(path), lineno, line, text_field)


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise PrepareError(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        yield from batch.column(0).to_pylist()


def iter_local(paths: list[Path], text_field: str) -> Iterator[str | JsonLine]:
    for path in paths:
        name = path.name
        if name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".json")):
            yield from _read_jsonl(path, text_field)
        elif name.endswith(".parquet"):
            yield from _read_parquet(path, text_field)
        elif name.endswith(".txt"):
            yield path.read_text(encoding="utf-8")
        else:
            raise PrepareError(
                f"{path}: unsupported file type (use .parquet, .jsonl, .jsonl.gz, .json.gz or .txt)"
            )


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached, found in seconds (datasets itself retries for ~25 s)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get(
        "HF_DATASETS_OFFLINE", "0"
    ) not in ("0", ""):
        return "offline mode is set (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as e:
        return f"{host} unreachable: {e}"
    return None


def iter_fineweb(name: str, revision: str | None, text_field: str, skip: int) -> Iterator[str]:
    """Stream FineWeb-EDU from the hub: no download of the whole set to memory or disk cache."""
    try:
        from datasets import load_dataset

        ds = load_dataset(FINEWEB_EDU, name=name, split="train", streaming=True, revision=revision)
        rows = iter(ds.skip(skip) if skip else ds)
        first = next(rows)  # touch the network now, so an offline machine fails at once
    except ImportError:
        raise PrepareError(
            "streaming FineWeb-EDU needs the data extra: pip install 'gpt2repro[data]'"
        ) from None
    except Exception as e:  # noqa: BLE001 - any hub failure means the same thing here
        raise PrepareError(
            f"cannot stream {FINEWEB_EDU} ({name}) from the Hugging Face hub ({type(e).__name__}); "
            "offline machines: download its parquet files elsewhere and pass them with --source"
        ) from None
    for row in itertools.chain([first], rows):
        yield row[text_field]


class _Progress:
    def __init__(self, total: int | None, initial: int, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total, initial=initial, unit="tok", unit_scale=True, disable=not enabled, desc="prepare"
        )

    def update(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def prepare(
    sources: list[str],
    out_dir: str | os.PathLike,
    *,
    name: str = "sample-10BT",
    revision: str | None = None,
    text_field: str = "text",
    shard_tokens: int = 100_000_000,
    val_tokens: int | None = None,
    max_tokens: int | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Tokenize `sources` (["fineweb-edu"] or local files/globs) into shards in `out_dir`; returns the manifest."""
    if shard_tokens <= 0:
        raise PrepareError(f"--shard-tokens must be positive, got {shard_tokens}")
    val_tokens = shard_tokens if val_tokens is None else val_tokens
    workers = workers or os.cpu_count() or 1
    remote = sources == ["fineweb-edu"]
    why = _hub_unreachable() if remote else None
    if why:
        raise PrepareError(
            f"cannot stream {FINEWEB_EDU} ({name}) from the Hugging Face hub ({why}); "
            "offline machines: download its parquet files elsewhere and pass them with --source"
        )
    paths = [] if remote else expand_sources(sources)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    args = dict(
        sources=sources if remote else [str(p) for p in paths],
        name=name if remote else None,
        revision=revision,
        text_field=text_field,
        shard_tokens=shard_tokens,
        val_tokens=val_tokens,
        max_tokens=max_tokens,
    )
    manifest = {
        "source": FINEWEB_EDU if remote else "local",
        "args": args,
        "tokenizer": {"name": "gpt2", "sha256": assets.REGISTRY["gpt2.tiktoken"].sha256},
        "package_version": __version__,
        "shards": [],
        "documents": 0,
        "total_tokens": 0,
        "next": {"doc": 0, "offset": 0},
        "complete": False,
    }
    if manifest_path.is_file():
        previous = json.loads(manifest_path.read_text())
        if previous.get("args") != args:
            raise PrepareError(
                f"{out} holds a preparation with different arguments ({previous.get('args')}); use a new --out"
            )
        if previous.get("complete"):
            print(
                f"{out}: already complete ({previous['total_tokens']:,} tokens in {len(previous['shards'])} shards); nothing to do"
            )
            return previous
        manifest = previous
        for stale in out.glob("*.bin"):  # a shard written after the last manifest update is redone
            if stale.name not in {s["file"] for s in manifest["shards"]}:
                stale.unlink()

    start_doc, start_offset = manifest["next"]["doc"], manifest["next"]["offset"]
    written = manifest["total_tokens"]
    if remote:
        texts: Iterator[str | JsonLine] = iter_fineweb(name, revision, text_field, skip=start_doc)
    else:
        texts = itertools.islice(iter_local(paths, text_field), start_doc, None)
    total = max_tokens or (FINEWEB_TOKENS.get(name) if remote else None)
    bar = _Progress(total, written, progress)
    buf = np.empty(shard_tokens, dtype=np.uint16)
    fill = 0

    def target() -> int:
        """Size of the shard being filled: val shards end exactly at val_tokens; max_tokens caps all."""
        size = min(shard_tokens, val_tokens - written) if written < val_tokens else shard_tokens
        return min(size, max_tokens - written) if max_tokens else size

    def flush(next_doc: int, next_offset: int) -> None:
        nonlocal written, fill
        split = "val" if written < val_tokens else "train"
        file = shard_name(split, len(manifest["shards"]))
        write_shard(out / file, buf[:fill])
        manifest["shards"].append(
            {"file": file, "split": split, "tokens": fill, "sha256": assets.sha256_file(out / file)}
        )
        written += fill
        fill = 0
        manifest.update(
            total_tokens=written, documents=next_doc, next={"doc": next_doc, "offset": next_offset}
        )
        atomic_write_text(manifest_path, json.dumps(manifest, indent=2))

    doc = start_doc  # index of the first document of the current batch
    pos = start_offset  # tokens of that document already in earlier shards
    done = max_tokens is not None and written >= max_tokens
    for toks, lengths in _encoded_batches(texts, workers):
        if done:
            break
        ends = np.cumsum(lengths)
        while pos < len(toks) and not done:
            take = min(target() - fill, len(toks) - pos)
            buf[fill : fill + take] = toks[pos : pos + take]
            fill, pos = fill + take, pos + take
            bar.update(take)
            if fill == target():
                d = int(np.searchsorted(ends, pos, side="right"))  # first document not fully written
                flush(doc + d, pos - (int(ends[d - 1]) if d else 0))
                done = max_tokens is not None and written >= max_tokens
        doc, pos = doc + len(lengths), 0
    if fill:
        flush(doc, 0)
    manifest["complete"] = True
    manifest["documents"] = manifest["next"]["doc"]
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2))
    bar.close()
    return manifest


def _encode(texts: list[str | JsonLine]) -> tuple[np.ndarray, np.ndarray]:
    """A batch of documents as one uint16 array (each document `<|endoftext|>` + its tokens) and the
    per-document token counts. Runs in worker processes: arrays pickle cheaply, lists do not."""
    enc = get_tokenizer()
    flat: list[int] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for i, t in enumerate(texts):
        ids = enc.encode_ordinary(t if isinstance(t, str) else t.text())
        flat.append(EOT_ID)
        flat.extend(ids)
        lengths[i] = len(ids) + 1
    toks = np.array(flat, dtype=np.int64)
    if len(toks) and toks.max() >= 2**16:
        raise PrepareError(f"token id {toks.max()} does not fit in uint16")
    return toks.astype(np.uint16), lengths


def _encoded_batches(
    texts: Iterator[str | JsonLine], workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encoded batches in order. With several workers, a process pool with a bounded number of
    batches in flight, so memory stays bounded however long the stream."""
    batches = iter(lambda: list(itertools.islice(texts, BATCH_DOCS)), [])
    if workers <= 1:
        yield from map(_encode, batches)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
