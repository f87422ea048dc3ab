"""Turn a corpus into GPT-2 token shards: `gpt2repro prepare`.

Each document becomes `<|endoftext|>` + encode_ordinary(text). Tokens fill fixed-size shards; the
first `val_tokens` form the `val` split (shard 0, as in the original), the rest `train`.

The input is cut into units (`sources.py`) that worker processes read, parse and encode by
themselves, so the main process only appends their tokens to the shard file being written
(`sink.py`, which also keeps the manifest an interrupted run resumes from). Memory stays bounded: a
few units are in flight, and shards go to disk as they fill.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import os
import tempfile
from collections.abc import Iterator

import numpy as np
from tqdm.auto import tqdm

from ..files.fsio import WriteError
from ..files.lock import DirLock
from ..text.tokenizer import EOT_ID, get_tokenizer
from .hubshards import HF_SHARDS, fetch_shards, is_hub_shards
from .sink import ShardSink, finished, make_out_dir, open_manifest, refused_write
from .sources import (
    FINEWEB_TOKENS,
    PrepareError,
    Unit,
    documents,
    fingerprint,
    units_cut,
)
from .stream import open_inputs, resume_units, source_args

SHARD_TOKENS = 100_000_000  # the original's shard size


def prepare(
    sources: list[str],
    out_dir: str | os.PathLike,
    *,
    name: str | None = None,
    split: str = "train",
    revision: str | None = None,
    text_field: str = "text",
    shard_tokens: int = SHARD_TOKENS,
    val_tokens: int | None = None,
    max_tokens: int | None = None,
    workers: int | None = None,
    max_shards: int | None = None,
    progress: bool = True,
) -> dict:
    """Tokenize `sources` into shards in `out_dir`; returns the manifest. Sources: local files, globs
    or directories of them; `fineweb-edu`; `hf:NAME` (any hub data set, streamed); a directory
    saved with `datasets.save_to_disk`; `hf-shards:REPO` (tokenized already: fetched, `max_shards`)."""
    _check_counts(shard_tokens, val_tokens, max_tokens, workers, max_shards)
    if is_hub_shards(sources) or max_shards is not None:  # tokenized already: fetched as they are
        tokenizing = dict(name=name, split=split, text_field=text_field, shard_tokens=shard_tokens)
        _fetch_only(sources, **tokenizing, max_tokens=max_tokens, workers=workers)
        return fetch_shards(sources, out_dir, max_shards, val_tokens, revision, progress)
    val_tokens = shard_tokens if val_tokens is None else val_tokens
    stream, paths, watched = open_inputs(sources, name, split)
    out = make_out_dir(out_dir)
    args = dict(
        **source_args(sources, stream, paths, revision),
        text_field=text_field,
        shard_tokens=shard_tokens,
        val_tokens=val_tokens,
        max_tokens=max_tokens,
    )
    with DirLock(out, "prepare"):  # one writer per data directory
        inputs = [fingerprint(p) for p in watched]
        manifest = open_manifest(out, args, stream.dataset if stream else "local", inputs, units_cut())
        if finished(out, manifest):
            return manifest
        units, skip = resume_units(manifest["next"], stream, paths, revision, text_field)
        _write_shards(
            ShardSink(out, manifest, shard_tokens, val_tokens, max_tokens),
            _encoded_units(units, skip, text_field, workers or usable_cpus()),
            max_tokens or (FINEWEB_TOKENS.get(stream.name) if stream else None),
            progress,
            len(paths),
        )
    return manifest


def _fetch_only(sources: list[str], **options) -> None:
    """Refuses max_shards for sources tokenized here, and for shards tokenized already the options
    that shape tokenizing (given other values than their defaults)."""
    if not is_hub_shards(sources):
        raise PrepareError(f"max_shards is for {HF_SHARDS} sources (the others stop at max_tokens)")
    defaults = dict(split="train", text_field="text", shard_tokens=SHARD_TOKENS)
    given = [key for key, value in options.items() if value != defaults.get(key)]
    if given:
        raise PrepareError(
            f"{given[0]} does not apply to {HF_SHARDS} sources: their shards are tokenized already"
        )


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
            raise refused_write(e, sink.out, len(sink.manifest["shards"])) from None


def _check_counts(
    shard_tokens: int,
    val_tokens: int | None,
    max_tokens: int | None,
    workers: int | None,
    max_shards: int | None,
) -> None:
    checks = [
        ("shard_tokens", shard_tokens, 1),
        ("val_tokens", val_tokens, 0),
        ("max_tokens", max_tokens, 1),
        ("workers", workers, 1),
        ("max_shards", max_shards, 1),
    ]
    for option, value, low in checks:
        if value is not None and value < low:
            raise PrepareError(f"{option} must be at least {low}, got {value}")


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
    for text in itertools.islice(documents(unit, field), skip, None):
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


def usable_cpus() -> int:
    """The CPUs this process may run on (a container's or `taskset`'s share), not the host's count:
    a 2-CPU job on a 64-core node forks 2 tokenizers, not 64."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


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
