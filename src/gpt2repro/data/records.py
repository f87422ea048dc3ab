"""The records `prepare --chat` reads, each with where it came from (`file:line`, `file: row N`,
`file: record N`) for its one-line error: JSON lines (gzipped or not, a BOM before the first line
skipped), `.json` files that are one array of records (Alpaca's `alpaca_data.json`), Parquet rows
and the rows of a streamed data set. A line that is not JSON (nesting too deep included) comes as
the ChatError to report for it, where bad records are handled; a file that cannot be read at all (a
truncated gzip stream, bytes that are not UTF-8) stops the preparation with one line naming it."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

from ..files import jsonio
from ..text.chat import ChatError
from .sources import PrepareError, brief
from .stream import Stream, iter_stream

CHAT_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")


def _json_records(path: Path, skip: int) -> Iterator[tuple[str, object]]:
    """(file:line, record or the ChatError of a line that is not JSON) of a jsonl(.gz) file."""
    n = 0
    try:
        with jsonio.open_text(path) as f:
            lines = ((n, line) for n, line in enumerate(f, 1) if line.strip())
            for n, line in itertools.islice(lines, skip, None):
                try:
                    yield f"{path}:{n}", jsonio.loads(line)
                except jsonio.NotJSON as e:
                    yield f"{path}:{n}", ChatError(str(e), "not JSON")
    except EOFError:  # gzip: the stream stops before its end marker
        raise PrepareError(
            f"{path}:{n + 1}: the gzip stream ends early, after line {n} (a truncated download?)"
        ) from None


def _array_records(path: Path, skip: int) -> Iterator[tuple[str, object]]:
    """(file: record N, record) of a `.json` file that is one JSON array."""
    try:
        records = jsonio.array_records(path)
    except jsonio.NotJSON as e:
        raise PrepareError(f"{path}{f':{e.lineno}' if e.lineno else ''}: {e}") from None
    for n, record in enumerate(records[skip:], skip + 1):
        yield f"{path}: record {n}", record


def _parquet_records(path: Path, skip: int) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        if index + batch.num_rows <= skip:
            index += batch.num_rows
            continue
        for row in batch.to_pylist():
            if index >= skip:
                yield f"{path}: row {index + 1}", row
            index += 1


def file_records(paths: list[Path], skip: int) -> Iterator[tuple[str, object]]:
    """The records of local files in order, from the `skip`-th on (whole files skipped by count)."""
    for path in paths:
        if not path.name.endswith(CHAT_SUFFIXES):
            raise PrepareError(
                f"{path}: unsupported file type for conversations (use {', '.join(CHAT_SUFFIXES)})"
            )
        try:
            if skip and skip >= (n := _count_records(path)):
                skip -= n
                continue
            yield from _reader(path)(path, skip)
        except (OSError, UnicodeDecodeError, ValueError, EOFError) as e:
            raise PrepareError(f"{path}: cannot read it as its extension says ({brief(e)})") from None
        skip = 0


def _reader(path: Path):
    if path.name.endswith(".parquet"):
        return _parquet_records
    return _array_records if jsonio.is_array_file(path) else _json_records


def _count_records(path: Path) -> int:
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return sum(1 for _ in _reader(path)(path, 0))


def stream_records(stream: Stream, revision: str | None, skip: int) -> Iterator[tuple[str, object]]:
    where = f"{stream.dataset} ({stream.name or 'default'}, {stream.split})"
    for n, row in enumerate(iter_stream(stream, revision, None, skip), skip + 1):
        yield f"{where}: row {n}", row
