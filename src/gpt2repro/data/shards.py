"""Token shards on disk.

The native format is llm.c's: a header of 256 int32 (magic 20240520, version 1, token count, rest
zero) followed by that many uint16 tokens, so llm.c / modded-nanogpt FineWeb shards load as they are.
build-nanogpt's `.npy` shards (a plain uint16 array) load too. Both are memory-mapped: opening a
100M-token shard costs no RAM."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import jsonio
from ..files.fsio import AtomicFile, sha256_file

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


class ShardError(UserError, ValueError):
    """A shard file is missing, malformed or does not match its header; the message names it."""


SPANS_DTYPE = np.dtype("<u4")  # [offset, length] pairs of a conversation shard's conversations


class ShardWriter:
    """Streams tokens into a new shard at `path`; `commit()` fills in the header's count and moves
    the file into place atomically. Tokens go to disk as they arrive, so preparing a 100M-token shard
    needs no shard-sized buffer, and a crash leaves no torn shard."""

    def __init__(self, path: str | os.PathLike):
        self.out = AtomicFile(path, "a token shard")
        self.out.file.write(bytes(HEADER_BYTES))  # the real header once the count is known
        self.count = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.dtype != np.uint16 and tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
            raise ShardError(f"{self.out.path}: token values must be in [0, 65536) to be stored as uint16")
        self.out.file.write(np.ascontiguousarray(tokens, dtype="<u2").data)
        self.count += tokens.size

    def commit(self) -> Path:
        header = np.zeros(HEADER_INTS, dtype="<i4")
        header[:3] = (MAGIC, VERSION, self.count)
        self.out.file.seek(0)
        self.out.file.write(header.tobytes())
        return self.out.commit()

    def discard(self) -> None:
        self.out.discard()


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> Path:
    """Write tokens (any integer array with values < 65536) as an llm.c shard, atomically."""
    writer = ShardWriter(path)
    try:
        writer.write(tokens)
    except BaseException:
        writer.discard()
        raise
    return writer.commit()


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """A read-only memory map of the shard's uint16 tokens, after validating the file."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: no such shard")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise ShardError(f"{path}: not a valid .npy shard ({e})") from None
        if arr.ndim != 1 or arr.dtype.kind not in "ui":
            raise ShardError(f"{path}: expected a 1-D integer array, got {arr.dtype} {arr.shape}")
        return arr
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: truncated: {size} bytes is shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ShardError(f"{path}: bad magic number {header[0]} (expected {MAGIC}); not an llm.c token shard")
    if header[1] != VERSION:
        raise ShardError(f"{path}: unsupported shard version {header[1]} (expected {VERSION})")
    count = int(header[2])
    expected = HEADER_BYTES + 2 * count
    if size != expected:
        raise ShardError(
            f"{path}: header says {count} tokens ({expected} bytes) but the file has {size} bytes"
        )
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def find_shards(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """Shards of a split, sorted: ours (`train_000001.bin`), llm.c's (`fineweb_train_000001.bin`)
    and build-nanogpt's (`edufineweb_train_000001.npy`)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ShardError(f"{data_dir}: data directory does not exist")
    pattern = re.compile(rf"(^|.*_){re.escape(split)}_\d+\.(bin|npy)$")
    shards = sorted(p for p in data_dir.iterdir() if pattern.match(p.name))
    if not shards:
        raise ShardError(f"{data_dir}: no {split!r} shards (expected files like {shard_name(split, 0)})")
    return shards


def verify_shards(data_dir: str | os.PathLike, rank: int = 0, world_size: int = 1) -> tuple[int, list[str]]:
    """Check shards against the sha256s that `prepare` recorded in manifest.json: this rank's
    share (every world_size-th shard), so ranks verify a data set together, each reading a part.
    Returns (shards checked, problems found)."""
    manifest_path = Path(data_dir) / "manifest.json"
    try:
        entries = json.loads(manifest_path.read_text())["shards"]
        listed = [(str(e["file"]), str(e["sha256"])) for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShardError(
            f"{manifest_path}: no readable manifest to verify against ({type(e).__name__})"
        ) from None
    problems = []
    mine = listed[rank::world_size]
    for name, expected in mine:
        path = Path(data_dir) / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256_file(path) != expected:
            problems.append(f"{path}: sha256 mismatch (corrupted or changed since prepare)")
    return len(mine), problems


def mask_path(shard: str | os.PathLike) -> Path:
    """Where the loss mask of a conversation shard lives: `train_000001.bin` -> `train_000001.mask`."""
    return Path(shard).with_suffix(".mask")


def read_mask(shard: str | os.PathLike, count: int) -> np.ndarray:
    """A read-only memory map of the shard's loss mask: one byte per token, 1 where training learns
    the token (`prepare --chat` writes it beside the shard; the shard's header holds the count)."""
    path = mask_path(shard)
    if not path.is_file():
        raise ShardError(
            f"{path}: no loss mask beside {Path(shard).name} (conversation data comes from prepare --chat)"
        )
    if path.stat().st_size != count:
        raise ShardError(f"{path}: {path.stat().st_size} bytes, but its shard holds {count} tokens")
    return np.memmap(path, dtype=np.uint8, mode="r", shape=(count,))


def manifest_sources(data_dir: str | Path) -> list[str]:
    """What a data directory was prepared from, as its manifest records it ([] without one)."""
    try:
        args = jsonio.loads((Path(data_dir) / "manifest.json").read_bytes()).get("args", {})
        found = args.get("sources") or [args.get("source")]
    except (OSError, jsonio.NotJSON, AttributeError):
        return []  # (verify_data, or the loader, names what is wrong with the directory)
    return [str(s) for s in found if s] if isinstance(found, list) else []


def spans_path(shard: str | os.PathLike) -> Path:
    """`train_000001.bin` -> `train_000001.spans`."""
    return Path(shard).with_suffix(".spans")


def conversation_spans(data_dir: str | os.PathLike, split: str) -> list[tuple[Path, np.ndarray]]:
    """Each shard of a split of conversation data with its conversations' (offset, length) rows in
    tokens, as the packer placed them. Data prepared before they were recorded is refused; a spans
    file that does not match its shard is one line."""
    path = Path(data_dir) / "manifest.json"
    try:
        listed = json.loads(path.read_text())["shards"]
        sha = {e["file"]: e["sha256"] for e in listed}
        entries = [
            (e["file"], e["tokens"], e.get("spans")) for e in listed if "mask" in e and e["split"] == split
        ]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShardError(
            f"{path}: no readable manifest of conversation shards ({type(e).__name__})"
        ) from None
    if any(spans is None for _, _, spans in entries):
        raise ShardError(
            f"{path}: prepared by an earlier version that did not record where its conversations lie; "
            "prepare it again (`gpt2repro prepare --chat`, into a new output directory)"
        )
    return [
        (Path(data_dir) / shard, _read_spans(Path(data_dir) / spans, sha.get(spans), tokens))
        for shard, tokens, spans in entries
    ]


def _read_spans(path: Path, sha256: str | None, tokens: int) -> np.ndarray:
    try:
        if sha256_file(path) != sha256:
            raise ShardError(f"{path}: sha256 mismatch (corrupted or changed since prepare)")
        spans = np.fromfile(path, dtype=SPANS_DTYPE).astype(np.int64)
    except OSError as e:
        raise ShardError(f"{path}: cannot read the conversations' spans ({e.strerror or e})") from None
    bad = ShardError(f"{path}: not [offset, length] pairs inside its shard of {tokens} tokens")
    if spans.size % 2 or not isinstance(tokens, int):
        raise bad
    spans = spans.reshape(-1, 2)
    if (spans[:, 1] < 1).any() or (spans.sum(axis=1) > tokens).any():
        raise bad
    return spans
