"""Turn a corpus into GPT-2 token shards: `gpt2repro prepare`.

Each document becomes `<|endoftext|>` + encode_ordinary(text). Tokens fill fixed-size shards; the
first `val_tokens` form the `val` split (shard 0, as in the original), the rest `train`.

The input is cut into units (byte ranges of a jsonl file, parquet row groups, text files; batches of
documents where this process has to read them: gzip, the hub stream) that worker processes read,
parse and encode by themselves, so the main process only appends their tokens to the shard file
being written.
After every shard the manifest records where the next one starts (the unit, documents into it and
tokens into that document), so an interrupted run resumes from its last complete shard and writes
exactly the shards an uninterrupted run would. Memory stays bounded: a few units are in flight, and
shards go to disk as they fill.
"""

from __future__ import annotations

import collections
import glob
import gzip
import hashlib
import itertools
import json
import multiprocessing
import os
import socket
import tempfile
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from .. import __version__, assets
from ..errors import UserError
from ..fsio import WriteError, atomic_write_text, sha256_file
from ..lock import DirLock
from ..tokenizer import EOT_ID, get_tokenizer
from .shards import ShardWriter, shard_name

FINEWEB_EDU = "HuggingFaceFW/fineweb-edu"
FINEWEB_TOKENS = {
    "sample-10BT": 10_000_000_000,
    "sample-100BT": 100_000_000_000,
    "sample-350BT": 350_000_000_000,
}
BATCH_DOCS = 256  # documents per unit where the main process reads them (gzip, hub stream)
UNIT_BYTES = 1 << 20  # bytes per unit of a plain jsonl file (~250k tokens)
TAIL_EIGHTHS = (4, 6, 7)  # cuts of a jsonl file's last unit, in eighths of it: 1/2, 1/4, 1/8, 1/8


SUFFIXES = (".parquet", ".jsonl", ".json", ".jsonl.gz", ".json.gz", ".txt")


class PrepareError(UserError, RuntimeError):
    """Bad source, malformed input row or an incompatible earlier run; the message says which."""


def expand_sources(sources: list[str]) -> list[Path]:
    paths: list[Path] = []
    for s in sources:
        if Path(s).is_dir():  # a directory of data files: its supported files, in name order
            found = sorted(p for p in Path(s).rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
            if not found:
                raise PrepareError(f"source {s!r}: a directory with no {', '.join(SUFFIXES)} files")
            paths.extend(found)
            continue
        matches = sorted(glob.glob(s)) if any(c in s for c in "*?[") else [s]
        if not matches or not all(Path(m).is_file() for m in matches):
            raise PrepareError(f"source {s!r}: no such file")
        paths.extend(Path(m) for m in matches)
    empty = [p for p in paths if p.stat().st_size == 0]
    if empty:
        raise PrepareError(f"{empty[0]}: empty file (no documents to tokenize)")
    return paths


def fingerprint(path: Path) -> dict:
    """What identifies an input file's content cheaply: size, mtime and a hash of its first and
    last MiB. A resumed preparation refuses inputs whose fingerprint changed."""
    stat = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, stat.st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return {
        "path": str(path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256_ends": h.hexdigest(),
    }


class Unit(NamedTuple):
    """A piece of the input that one worker reads and encodes by itself, so the main process only
    collects tokens and writes shards. Units come in a fixed order; (file, part) names one, and the
    manifest's resume point is a unit plus a number of its documents to skip."""

    kind: str  # jsonl: a byte range | parquet: a row group | txt: a file | lines, texts: a batch
    path: str
    file: int  # index of path among the sources
    part: int
    data: tuple = ()  # jsonl: (start, end) bytes; lines: (line numbers, lines); texts: (texts,)


def _batched(items: Iterator) -> Iterator[list]:
    """Lists of BATCH_DOCS consecutive items (the last one shorter): units of a stream this process reads."""
    return iter(lambda: list(itertools.islice(items, BATCH_DOCS)), [])


def _parse_json(line: bytes | str, path: str, lineno: int | Callable[[], int], field: str) -> str:
    """`lineno` is a number or a function computing it: only needed for the error message."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        problem = f"not valid JSON ({e.msg})"
    else:
        if isinstance(row, dict) and isinstance(row.get(field), str):
            return row[field]
        problem = f"no string field {field!r}"
    raise PrepareError(f"{path}:{lineno if isinstance(lineno, int) else lineno()}: {problem}")


def _jsonl_bounds(size: int) -> list[int]:
    """Byte offsets cutting a jsonl file of `size` bytes into units: UNIT_BYTES each, except that the
    last one is cut at TAIL_EIGHTHS, so the workers finish a file (and the run) together rather than
    one of them finishing its last full unit alone."""
    bounds = list(range(0, size, UNIT_BYTES))
    last = bounds[-1] if bounds else 0
    bounds += [last + (size - last) * k // 8 for k in TAIL_EIGHTHS if (size - last) * k // 8 > 0]
    return sorted(set(bounds)) + [size]


def _jsonl_range(path: str, start: int, end: int, field: str) -> Iterator[str]:
    """Documents of the lines that start inside bytes [start, end) of a jsonl file."""
    with open(path, "rb") as f:
        if start:
            f.seek(start - 1)
            f.readline()  # the rest of a line that began in the previous range
        first = f.tell()
        data = f.read(max(0, end - first)) if first < end else b""
        if data and not data.endswith(b"\n"):
            data += f.readline()  # the last line starting in this range, in full
    offset = first
    for line in data.split(b"\n"):
        if line.strip():
            yield _parse_json(line, path, lambda o=offset: _line_number(path, o), field)
        offset += len(line) + 1


def _line_number(path: str, offset: int) -> int:
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


def _unreadable(path: str | Path, e: Exception) -> PrepareError:
    return PrepareError(
        f"{path}: cannot read it as its extension says ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    )


def _texts(unit: Unit, field: str) -> Iterator[str]:
    """The unit's documents, each checked to be text; unreadable input is a PrepareError naming the file."""
    try:
        for text in _unit_texts(unit, field):
            if not isinstance(text, str):
                raise PrepareError(f"{unit.path}: a {field!r} value is {type(text).__name__}, not text")
            yield text
    except PrepareError:
        raise
    except Exception as e:  # noqa: BLE001 - decoding, gzip, parquet and OS errors all mean this
        raise _unreadable(unit.path, e) from None


def _unit_texts(unit: Unit, field: str) -> Iterator[str]:
    if unit.kind == "jsonl":
        yield from _jsonl_range(unit.path, *unit.data, field)
    elif unit.kind == "parquet":
        import pyarrow.parquet as pq

        yield from pq.ParquetFile(unit.path).read_row_group(unit.part, columns=[field]).column(0).to_pylist()
    elif unit.kind == "txt":
        yield Path(unit.path).read_text(encoding="utf-8")
    elif unit.kind == "lines":
        for lineno, line in zip(*unit.data):
            yield _parse_json(line, unit.path, lineno, field)
    else:
        yield from unit.data[0]


def _file_units(path: Path, file: int, field: str, start_part: int) -> Iterator[Unit]:
    name = path.name
    if name.endswith((".jsonl.gz", ".json.gz")):  # no seeking in gzip: this process reads the lines
        with gzip.open(path, "rt", encoding="utf-8") as f:
            numbered = ((n, line) for n, line in enumerate(f, 1) if line.strip())
            for part, batch in enumerate(_batched(numbered)):
                if part >= start_part:
                    yield Unit("lines", str(path), file, part, tuple(zip(*batch)))
    elif name.endswith((".jsonl", ".json")):
        bounds = _jsonl_bounds(path.stat().st_size)
        for part in range(start_part, len(bounds) - 1):
            yield Unit("jsonl", str(path), file, part, (bounds[part], bounds[part + 1]))
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if field not in pf.schema_arrow.names:
            raise PrepareError(f"{path}: no column {field!r} (columns: {', '.join(pf.schema_arrow.names)})")
        for part in range(start_part, pf.num_row_groups):
            yield Unit("parquet", str(path), file, part)
    elif name.endswith(".txt"):
        if start_part == 0:
            yield Unit("txt", str(path), file, 0)
    else:
        raise PrepareError(
            f"{path}: unsupported file type (use .parquet, .jsonl, .jsonl.gz, .json.gz or .txt)"
        )


def local_units(paths: list[Path], field: str, start: tuple[int, int] = (0, 0)) -> Iterator[Unit]:
    """Units of local files in order, from (file index, part) on."""
    for i, path in enumerate(paths):
        if i >= start[0]:
            try:
                yield from _file_units(path, i, field, start[1] if i == start[0] else 0)
            except PrepareError:
                raise
            except Exception as e:  # noqa: BLE001 - a fake .gz or .parquet, bytes that are not UTF-8
                raise _unreadable(path, e) from None


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


class Stream(NamedTuple):
    """A data set this process reads row by row and hands to the workers in batches: a hub data set
    (streamed, nothing downloaded whole) or a directory saved with `datasets.save_to_disk`. Resumed
    by document count."""

    kind: str  # hub | disk
    dataset: str  # hub name (or a local path datasets loads the same way) | the saved directory
    name: str | None  # the data set's config, e.g. sample-10BT
    split: str


def resolve_stream(sources: list[str], name: str | None, split: str) -> Stream | None:
    """`fineweb-edu`, `hf:NAME` or a save_to_disk directory as a Stream; None for local files."""
    if len(sources) != 1:
        return None
    source = sources[0]
    if source == "fineweb-edu":
        return Stream("hub", FINEWEB_EDU, name or "sample-10BT", split)
    if source.startswith("hf:"):
        return Stream("hub", source[3:], name, split)
    path = Path(source)
    if path.is_dir() and any(
        (path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")
    ):
        return Stream("disk", str(path), None, split)
    return None


def _open_stream(stream: Stream, revision: str | None):
    from datasets import DatasetDict, load_dataset, load_from_disk

    if stream.kind == "hub":
        return load_dataset(
            stream.dataset, name=stream.name, split=stream.split, streaming=True, revision=revision
        )
    ds = load_from_disk(stream.dataset)
    if isinstance(ds, DatasetDict):
        if stream.split not in ds:
            raise PrepareError(f"{stream.dataset}: no split {stream.split!r} (splits: {', '.join(ds)})")
        ds = ds[stream.split]
    return ds.to_iterable_dataset()


def iter_stream(stream: Stream, revision: str | None, field: str | None, skip: int) -> Iterator:
    """The stream's `field` values (whole rows for None) from document `skip` on."""
    where = f"{stream.dataset} ({stream.name or 'default'}, {stream.split})"
    try:
        ds = _open_stream(stream, revision)
        rows = iter(ds.skip(skip) if skip else ds)
        first = next(rows, None)  # touch the network now, so an offline machine fails at once
    except ImportError:
        raise PrepareError(
            "streaming a data set needs the data extra: pip install 'gpt2repro[data]'"
        ) from None
    except PrepareError:
        raise
    except Exception as e:  # noqa: BLE001 - any hub or loading failure means the same thing here
        raise PrepareError(
            f"cannot stream {where} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "offline machines: download its parquet files elsewhere and pass them with --source"
        ) from None
    for row in itertools.chain([first] if first is not None else [], rows):
        if field is not None and field not in row:
            raise PrepareError(f"{where}: no column {field!r} (columns: {', '.join(row)})")
        yield row if field is None else row[field]  # None: whole rows (conversations)


def _open_manifest(out: Path, args: dict, source: str, inputs: list[dict]) -> dict:
    """A new manifest for `args`, or the earlier run's in `out` when it was made with the same
    arguments, the same cut into units and unchanged inputs (its unfinished shards are removed, to
    be redone)."""
    manifest = {
        "source": source,
        "args": args,
        # how the input is cut into units: the resume point counts them
        "units": {
            "jsonl_bytes": UNIT_BYTES,
            "jsonl_tail_eighths": list(TAIL_EIGHTHS),
            "batch_docs": BATCH_DOCS,
        },
        "inputs": inputs,
        "tokenizer": {"name": "gpt2", "sha256": assets.REGISTRY["gpt2.tiktoken"].sha256},
        "package_version": __version__,
        "shards": [],
        "documents": 0,
        "total_tokens": 0,
        "next": {"doc": 0, "offset": 0},
        "complete": False,
    }
    path = out / "manifest.json"
    if not path.is_file():
        return manifest
    try:
        previous = json.loads(path.read_text())
        previous["shards"], previous["complete"]  # noqa: B018 - the keys a resume needs
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PrepareError(f"{path}: unreadable manifest ({type(e).__name__}); use a new --out") from None
    if previous.get("args") != args:
        raise PrepareError(
            f"{out} holds a preparation with different arguments ({previous.get('args')}); use a new --out"
        )
    if not previous.get("complete") and previous.get("units") != manifest["units"]:
        raise PrepareError(
            f"{out} was cut into units another way ({previous.get('units')}; this version: "
            f"{manifest['units']}), so its resume point means nothing here; use a new --out"
        )
    changed = [new["path"] for old, new in zip(previous.get("inputs", inputs), inputs) if old != new]
    if not previous["complete"] and changed:
        raise PrepareError(
            f"{changed[0]} changed since the interrupted preparation in {out} (size, mtime or content); "
            "resuming would mix old and new text: use a new --out"
        )
    if not previous.get("complete"):
        # shards and temporary files written after the last manifest update are redone
        for stale in [*out.glob("*.bin"), *out.glob(".*.tmp")]:
            if stale.name not in {s["file"] for s in previous["shards"]}:
                stale.unlink()
    return previous


class ShardSink:
    """Where the tokens go: shards of the right size (the val split first, exactly `val_tokens`;
    then train; `max_tokens` caps all), each written to disk as tokens arrive and committed with
    the point to resume from after it recorded in the manifest."""

    def __init__(self, out: Path, manifest: dict, shard_tokens: int, val_tokens: int, max_tokens: int | None):
        self.out, self.manifest = out, manifest
        self.shard_tokens, self.val_tokens, self.max_tokens = shard_tokens, val_tokens, max_tokens
        self.written = manifest["total_tokens"]
        self.shard: ShardWriter | None = None

    @property
    def done(self) -> bool:
        return self.max_tokens is not None and self.written >= self.max_tokens

    def _split(self) -> str:
        return "val" if self.written < self.val_tokens else "train"

    def _target(self) -> int:
        """Size of the shard being filled."""
        if self.written < self.val_tokens:
            size = min(self.shard_tokens, self.val_tokens - self.written)
        else:
            size = self.shard_tokens
        return min(size, self.max_tokens - self.written) if self.max_tokens else size

    def write(self, tokens: np.ndarray) -> int:
        """Append as many of `tokens` as the current shard takes; how many it took."""
        if self.shard is None:
            self.shard = ShardWriter(self.out / shard_name(self._split(), len(self.manifest["shards"])))
        take = min(self._target() - self.shard.count, len(tokens))
        self.shard.write(tokens[:take])
        return take

    @property
    def full(self) -> bool:
        return self.shard is not None and self.shard.count == self._target()

    def commit(self, next_doc: int, next_offset: int, where: dict, final: bool = False) -> None:
        """Commit the shard; the next one starts `next_offset` tokens into document `next_doc`, found
        at `where` in the input (`final`: the input is exhausted and the manifest is complete)."""
        path = self.shard.commit()
        self.manifest["shards"].append(
            {
                "file": path.name,
                "split": self._split(),
                "tokens": self.shard.count,
                "sha256": sha256_file(path),
            }
        )
        self.written += self.shard.count
        self.shard = None
        self.manifest.update(
            total_tokens=self.written,
            documents=next_doc,
            next={"doc": next_doc, "offset": next_offset, **where},
            complete=final,
        )
        self._write_manifest()

    def finish(self, next_doc: int, end: dict) -> None:
        """The input ended (or max_tokens did): commit the partial shard, mark the set complete."""
        if self.shard is not None:
            self.commit(next_doc, 0, end, final=True)
        elif not self.manifest["complete"]:
            self.manifest["complete"] = True
            self._write_manifest()

    def discard(self) -> None:
        if self.shard is not None:
            self.shard.discard()

    def _write_manifest(self) -> None:
        atomic_write_text(self.out / "manifest.json", json.dumps(self.manifest, indent=2), "the manifest")


def prepare(
    sources: list[str],
    out_dir: str | os.PathLike,
    *,
    name: str | None = None,
    split: str = "train",
    revision: str | None = None,
    text_field: str = "text",
    shard_tokens: int = 100_000_000,
    val_tokens: int | None = None,
    max_tokens: int | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Tokenize `sources` into shards in `out_dir`; returns the manifest. Sources: local files, globs
    or directories of them; `fineweb-edu`; `hf:NAME` (any hub data set, streamed); a directory
    saved with `datasets.save_to_disk`."""
    _check_counts(shard_tokens, val_tokens, max_tokens, workers)
    val_tokens = shard_tokens if val_tokens is None else val_tokens
    stream, paths, watched = _inputs(sources, name, split)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrepareError(f"{out}: cannot create the output directory ({e.strerror or e})") from None
    args = dict(
        sources=sources if stream else [str(p) for p in paths],
        name=stream.name if stream else None,
        split=stream.split if stream else None,
        revision=revision,
        text_field=text_field,
        shard_tokens=shard_tokens,
        val_tokens=val_tokens,
        max_tokens=max_tokens,
    )
    with DirLock(out, "prepare"):  # one writer per data directory
        manifest = _open_manifest(
            out, args, stream.dataset if stream else "local", [fingerprint(p) for p in watched]
        )
        if manifest["complete"]:
            print(
                f"{out}: already complete ({manifest['total_tokens']:,} tokens in {len(manifest['shards'])} shards); nothing to do"
            )
            return manifest
        units, skip = _resume_units(manifest["next"], stream, paths, revision, text_field)
        _write_shards(
            ShardSink(out, manifest, shard_tokens, val_tokens, max_tokens),
            _encoded_units(units, skip, text_field, workers or os.cpu_count() or 1),
            max_tokens or (FINEWEB_TOKENS.get(stream.name) if stream else None),
            progress,
            len(paths),
        )
    return manifest


def _write_shards(
    sink: ShardSink, encoded: Iterator, total: int | None, progress: bool, n_files: int
) -> None:
    """Fill the sink behind a progress bar. A full or read-only disk ends it, keeping what was committed."""
    with tqdm(
        total=total, initial=sink.written, unit="tok", unit_scale=True, disable=not progress, desc="prepare"
    ) as bar:
        try:
            _fill(sink, encoded, bar, n_files)
        except (OSError, WriteError) as e:
            why = (
                str(e) if isinstance(e, WriteError) else f"{sink.out}: {e.strerror or e} while writing shards"
            )
            raise PrepareError(
                f"{why}; the {len(sink.manifest['shards'])} shards committed so far are kept: free space "
                "and rerun the same command to resume"
            ) from None


def _inputs(sources: list[str], name: str | None, split: str) -> tuple[Stream | None, list[Path], list[Path]]:
    """(the stream to read, or None; the local files to read; the files whose change a resume refuses)."""
    stream = resolve_stream(sources, name, split)
    if stream is None:
        paths = expand_sources(sources)
        return None, paths, paths
    why = _hub_unreachable() if stream.kind == "hub" and not Path(stream.dataset).exists() else None
    if why:
        raise PrepareError(
            f"cannot stream {stream.dataset} from the Hugging Face hub ({why}); "
            "offline machines: download its parquet files elsewhere and pass them with --source"
        )
    return stream, [], sorted(Path(stream.dataset).rglob("*.arrow")) if stream.kind == "disk" else []


def _check_counts(
    shard_tokens: int, val_tokens: int | None, max_tokens: int | None, workers: int | None
) -> None:
    checks = [
        ("--shard-tokens", shard_tokens, 1),
        ("--val-tokens", val_tokens, 0),
        ("--max-tokens", max_tokens, 1),
        ("--workers", workers, 1),
    ]
    for option, value, low in checks:
        if value is not None and value < low:
            raise PrepareError(f"{option} must be at least {low}, got {value}")


def _resume_units(
    nxt: dict, stream: Stream | None, paths: list[Path], revision: str | None, field: str
) -> tuple[Iterator[Unit], int]:
    """The units from the resume point on, and how many documents of the first one to skip."""
    if stream:  # a stream is resumed by document count; its batches are units
        texts = iter_stream(stream, revision, field, skip=nxt["doc"])
        return (Unit("texts", "", 0, k, (b,)) for k, b in enumerate(_batched(texts))), 0
    return local_units(paths, field, (nxt.get("file", 0), nxt.get("part", 0))), nxt.get("skip", 0)


def _fill(sink: ShardSink, encoded: Iterator, bar, n_files: int) -> None:
    """Stream the encoded units into the sink, committing each shard as it fills."""
    doc, pos = (
        sink.manifest["next"]["doc"],
        sink.manifest["next"]["offset"],
    )  # the first document of a unit, tokens of it already written
    try:
        for unit, skip, (toks, lengths) in encoded:
            if sink.done:
                break
            ends = np.cumsum(lengths)
            while pos < len(toks) and not sink.done:
                take = sink.write(toks[pos:])
                pos += take
                bar.update(take)
                if sink.full:
                    d = int(np.searchsorted(ends, pos, side="right"))  # first document not fully written
                    where = {"file": unit.file, "part": unit.part, "skip": skip + d}
                    sink.commit(doc + d, pos - (int(ends[d - 1]) if d else 0), where)
            doc, pos = doc + len(lengths), 0
    except BaseException:
        sink.discard()
        raise
    finally:
        encoded.close()  # stops the workers and removes their scratch files, also when stopping early
    sink.finish(doc, {"file": n_files, "part": 0, "skip": 0})


def _encode(unit: Unit, skip: int, field: str) -> tuple[np.ndarray, np.ndarray]:
    """A unit's documents from the `skip`-th on as one uint16 array (each document `<|endoftext|>` +
    its tokens) and the per-document token counts. Runs in the worker processes, reading included."""
    enc = get_tokenizer()
    flat: list[int] = []
    lengths: list[int] = []
    for text in itertools.islice(_texts(unit, field), skip, None):
        ids = enc.encode_ordinary(text)
        flat.append(EOT_ID)
        flat.extend(ids)
        lengths.append(len(ids) + 1)
    toks = np.array(flat, dtype=np.int64)
    if len(toks) and toks.max() >= 2**16:
        raise PrepareError(f"token id {toks.max()} does not fit in uint16")
    return toks.astype(np.uint16), np.array(lengths, dtype=np.int64)


def _encode_to_file(unit: Unit, skip: int, field: str, scratch: str) -> tuple[str, np.ndarray]:
    """`_encode` in a worker process. The tokens come back through a scratch file, not the result
    pipe: in `bench prepare` that halved the CPU time of the main process, which shares the cores."""
    toks, lengths = _encode(unit, skip, field)
    fd, path = tempfile.mkstemp(dir=scratch)
    with os.fdopen(fd, "wb") as f:
        f.write(toks.data)
    return path, lengths


def _collect(result) -> tuple[np.ndarray, np.ndarray]:
    path, lengths = result.get()
    toks = np.fromfile(path, dtype=np.uint16)
    os.unlink(path)
    return toks, lengths


def _encoded_units(
    units: Iterator[Unit], start_skip: int, field: str, workers: int
) -> Iterator[tuple[Unit, int, tuple[np.ndarray, np.ndarray]]]:
    """(unit, skip, encoded) in order. With several workers, a process pool with a bounded number of
    units in flight, so memory stays bounded however long the input."""
    jobs = ((u, start_skip if i == 0 else 0) for i, u in enumerate(units))
    if workers <= 1:
        for unit, skip in jobs:
            yield unit, skip, _encode(unit, skip, field)
        return
    get_tokenizer()  # loaded once here; the forked workers share it
    with (
        tempfile.TemporaryDirectory(prefix="gpt2repro-prepare-") as scratch,
        multiprocessing.get_context("fork").Pool(workers) as pool,
    ):
        submitted = ((u, k, pool.apply_async(_encode_to_file, (u, k, field, scratch))) for u, k in jobs)
        pending = collections.deque(itertools.islice(submitted, 4 * workers))
        while pending:
            unit, skip, result = pending.popleft()
            pending.extend(itertools.islice(submitted, 1))  # keep 4 units per worker in flight
            yield unit, skip, _collect(result)
