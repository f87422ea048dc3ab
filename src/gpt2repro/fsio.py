"""Atomic publishing of files and directories, shared by shards, manifests, checkpoints, exports and
the asset cache: write a temporary beside the target, fsync it, rename it over the target, fsync the
parent directory. A crash or a full disk at any point leaves either the old file (or directory) or
the new one, never a torn one. Everything is created with the usual permissions (0666 / 0777 less
the umask), not mkstemp's private 0600, so shared data sets and checkpoints are readable."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_permissions(path: str | os.PathLike) -> None:
    """0666 less the umask, for a file a library created private (0600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


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


def fsync_tree(root: Path) -> None:
    """fsync every file and directory below `root` (deepest first), then `root` itself."""
    for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
        if path.is_dir():
            fsync_dir(path)
        else:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(root)


class AtomicDir:
    """A directory that appears complete or not at all: files are written into `.name.tmp` beside
    `path`; `commit()` fsyncs them and renames the directory into place. An existing target is
    replaced only with `replace=True` (an empty one always may be); a leftover temporary directory
    of a killed earlier attempt is removed first."""

    def __init__(self, path: str | os.PathLike, replace: bool = False):
        self.path = Path(path)
        self.replace = replace
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.parent / f".{self.path.name}.tmp"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()

    def commit(self) -> Path:
        try:
            fsync_tree(self.tmp)
            old = None
            if self.path.exists() and any(self.path.iterdir()):
                if not self.replace:
                    raise FileExistsError(f"{self.path}: exists and is not empty")
                old = self.path.parent / f".{self.path.name}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(self.path, old)
            os.replace(self.tmp, self.path)  # onto an absent or empty directory
        except BaseException:
            self.discard()
            raise
        fsync_dir(self.path.parent)
        if old is not None:
            shutil.rmtree(old)
        return self.path

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()
