"""Atomic file writes shared by shards, manifests, checkpoints and exports: write a temporary file
in the same directory, fsync it, rename it over the target, fsync the directory. A crash or a full
disk at any point leaves either the old file or the new one, never a torn one."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFile:
    """A temporary file beside `path`, opened for writing as `.file`. `commit()` moves it over `path`
    once it is on disk; `discard()` (or an exception inside a `with` block) removes it. Lets a writer
    stream a large file (a token shard) without ever exposing it half-written."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.parent / f".{self.path.name}.{secrets.token_hex(6)}.tmp"
        # not mkstemp: its files are private (0600); this one gets the usual 0666 & ~umask, so a
        # shared data set or checkpoint is readable like any other file
        self.file: BinaryIO = os.fdopen(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")

    def commit(self) -> Path:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        fsync_dir(self.path.parent)
        return self.path

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call write(f) on a temporary file and move it to `path` only once it is complete on disk."""
    with AtomicFile(path) as out:
        write(out.file)
    return out.path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))
