"""Where `prepare`'s documents come from, cut into units a worker reads by itself.

Local files (jsonl byte ranges, parquet row groups, whole text files; gzip in batches of lines this
process reads, as it cannot seek) and data sets this process streams row by row (a hub data set, a
`datasets.save_to_disk` directory) handed on in batches. Units come in a fixed order, so a resume
point is a unit plus documents into it; `units_cut()` records how the cut was made.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from ..errors import UserError
from ..files import jsonio
from ..files.download import brief

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

    kind: str  # jsonl: a byte range | parquet: a row group | txt, array: a file | lines, texts: a batch
    path: str
    file: int  # index of path among the sources
    part: int
    data: tuple = ()  # jsonl: (start, end) bytes; lines: (line numbers, lines); texts: (texts,)


def batched(items: Iterator) -> Iterator[list]:
    """Lists of BATCH_DOCS consecutive items (the last one shorter): units of a stream this process reads."""
    return iter(lambda: list(itertools.islice(items, BATCH_DOCS)), [])


def _parse_json(line: bytes | str, path: str, lineno: int | Callable[[], int], field: str) -> str:
    """`lineno` is a number or a function computing it: only needed for the error message."""
    try:
        return _text_of(jsonio.loads(line), field)
    except (jsonio.NotJSON, PrepareError) as e:
        raise PrepareError(f"{path}:{lineno if isinstance(lineno, int) else lineno()}: {e}") from None


def _text_of(row: object, field: str) -> str:
    if isinstance(row, dict) and isinstance(row.get(field), str):
        return row[field]
    if not isinstance(row, dict):
        raise PrepareError(f"a record is {type(row).__name__}, not an object with a string field {field!r}")
    got = "missing" if field not in row else f"{type(row[field]).__name__}, not text"
    raise PrepareError(f"no string field {field!r} ({field!r} is {got})")


def _array_texts(path: str, field: str) -> Iterator[str]:
    """The documents of a `.json` file that is one array of records (its n-th record named in errors)."""
    try:
        records = jsonio.array_records(path)
    except jsonio.NotJSON as e:
        raise PrepareError(f"{path}{f':{e.lineno}' if e.lineno else ''}: {e}") from None
    for n, row in enumerate(records, 1):
        try:
            yield _text_of(row, field)
        except PrepareError as e:
            raise PrepareError(f"{path}: record {n} of the array: {e}") from None


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
    return PrepareError(f"{path}: cannot read it as its extension says ({brief(e)})")


def documents(unit: Unit, field: str) -> Iterator[str]:
    """The unit's documents, each checked to be text; unreadable input is a PrepareError naming the file."""
    try:
        for n, text in enumerate(_unit_texts(unit, field), 1):
            if not isinstance(text, str):  # a parquet column or a streamed row: named by its place
                where = f"{unit.path or 'the stream'} (part {unit.part + 1}, document {n})"
                raise PrepareError(f"{where}: a {field!r} value is {type(text).__name__}, not text")
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
    elif unit.kind == "array":
        yield from _array_texts(unit.path, field)
    elif unit.kind == "lines":
        for lineno, line in zip(*unit.data):
            yield _parse_json(line, unit.path, lineno, field)
    else:
        yield from unit.data[0]


def _gzip_units(path: Path, file: int, start_part: int) -> Iterator[Unit]:
    numbered = ((n, line) for n, line in _gzip_lines(path) if line.strip())
    for part, batch in enumerate(batched(numbered)):
        if part >= start_part:
            yield Unit("lines", str(path), file, part, tuple(zip(*batch)))


def _gzip_lines(path: Path) -> Iterator[tuple[int, str]]:
    """A gzipped file's numbered lines; a stream cut short (a truncated download) names the line
    after the last whole one (the units before it are tokenized and kept, as for any stop)."""
    read = 0
    try:
        with jsonio.open_text(path) as f:
            for read, line in enumerate(f, 1):
                yield read, line
    except EOFError:
        raise PrepareError(
            f"{path}:{read + 1}: the gzip stream ends early, after line {read} (a truncated download?)"
        ) from None


def _file_units(path: Path, file: int, field: str, start_part: int) -> Iterator[Unit]:
    name = path.name
    if jsonio.is_array_file(path):  # one JSON array of records: read whole by a worker
        if start_part == 0:
            yield Unit("array", str(path), file, 0)
    elif name.endswith((".jsonl.gz", ".json.gz")):  # no seeking in gzip: this process reads the lines
        yield from _gzip_units(path, file, start_part)
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


def units_cut() -> dict:
    """How the input is cut into units, recorded in the manifest: a resume point counts them, so a
    version cutting them another way cannot resume it."""
    return {"jsonl_bytes": UNIT_BYTES, "jsonl_tail_eighths": list(TAIL_EIGHTHS), "batch_docs": BATCH_DOCS}
