"""Data sets `prepare` reads row by row — a hub data set streamed (nothing downloaded whole) or a
directory saved with `datasets.save_to_disk` — and the choice between such a stream and local files.

A stream is resumed by document count, so a failure mid-stream (a 429, a reset, a stall that
`datasets`' own retries did not absorb) reopens it where it stopped: the same documents in the same
order, as if nothing had failed. Opening is retried like every download (`files.download`)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from ..files.download import RetryPolicy, backoff, retrying, say, transient
from ..files.hub import unreachable as hub_unreachable
from .sources import FINEWEB_EDU, PrepareError, Unit, batched, brief, expand_sources, local_units


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
    """The stream's `field` values (whole rows for None) from document `skip` on, reopened where it
    stopped after a transient failure (each reopening after progress; an opening that keeps failing
    gives up within the retry policy)."""
    where = f"{stream.dataset} ({stream.name or 'default'}, {stream.split})"
    policy = RetryPolicy.from_env()
    read, failures = skip, 0
    while True:
        rows = _opened(stream, revision, read, where, policy)
        try:
            for row in rows:
                if field is not None and field not in row:
                    raise PrepareError(f"{where}: no column {field!r} (columns: {', '.join(row)})")
                yield row if field is None else row[field]  # None: whole rows (conversations)
                read += 1
            return
        except Exception as e:
            failure = transient(e)
            if failure is None:
                raise
            failures += 1
            delay = backoff(policy, failures, failure[1])
            say(f"streaming {where}: {failure[0]} after document {read}; reopening there in {delay:.1f} s")
            time.sleep(delay)


def _opened(stream: Stream, revision: str | None, skip: int, where: str, policy: RetryPolicy) -> Iterator:
    """The stream's rows from `skip` on, its first row read (an offline machine fails at once)."""

    def open_once() -> Iterator:
        ds = _open_stream(stream, revision)
        rows = iter(ds.skip(skip) if skip else ds)
        first = next(rows, None)
        return itertools.chain([first] if first is not None else [], rows)

    try:
        return retrying(open_once, f"streaming {where}", policy)
    except ImportError:
        raise PrepareError(
            "streaming a data set needs the data extra: pip install 'gpt2repro[data]'"
        ) from None
    except PrepareError:
        raise
    except Exception as e:  # noqa: BLE001 - any hub or loading failure means the same thing here
        raise PrepareError(
            f"cannot stream {where} ({brief(e)}); "
            "offline machines: download its parquet files elsewhere and pass them with --source"
        ) from None


def open_inputs(
    sources: list[str], name: str | None, split: str
) -> tuple[Stream | None, list[Path], list[Path]]:
    """(the stream to read, or None; the local files to read; the files whose change a resume refuses)."""
    stream = resolve_stream(sources, name, split)
    if stream is None:
        paths = expand_sources(sources)
        return None, paths, paths
    why = hub_unreachable() if stream.kind == "hub" and not Path(stream.dataset).exists() else None
    if why:
        raise PrepareError(
            f"cannot stream {stream.dataset} from the Hugging Face hub ({why}); "
            "offline machines: download its parquet files elsewhere and pass them with --source"
        )
    return stream, [], sorted(Path(stream.dataset).rglob("*.arrow")) if stream.kind == "disk" else []


def resume_units(
    nxt: dict, stream: Stream | None, paths: list[Path], revision: str | None, field: str
) -> tuple[Iterator[Unit], int]:
    """The units from the resume point on, and how many documents of the first one to skip."""
    if stream:  # a stream is resumed by document count; its batches are units
        texts = iter_stream(stream, revision, field, skip=nxt["doc"])
        return (Unit("texts", "", 0, k, (b,)) for k, b in enumerate(batched(texts))), 0
    return local_units(paths, field, (nxt.get("file", 0), nxt.get("part", 0))), nxt.get("skip", 0)


def source_args(sources: list[str], stream: Stream | None, paths: list[Path], revision: str | None) -> dict:
    """What a manifest records of where the input came from (a resume needs the same)."""
    return dict(
        sources=sources if stream else [str(p) for p in paths],
        name=stream.name if stream else None,
        split=stream.split if stream else None,
        revision=revision,
    )
