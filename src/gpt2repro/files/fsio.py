"""Atomic publishing of files and directories, shared by shards, manifests, checkpoints, exports and
the asset cache: write a temporary beside the target, fsync it, rename it over the target, fsync the
parent directory. A crash or a full disk at any point leaves either the old file (or directory) or
the new one, never a torn one. Everything is created with the usual permissions (0666 / 0777 less
the umask), not mkstemp's private 0600, so shared data sets and checkpoints are readable.

When the file system refuses a write (no space, a read-only or vanished directory, no permission)
the temporaries are removed and a `WriteError` names the path, what was being written, the space
free and, where known beforehand, the space needed. Temporary names are unique per writer; the
leftovers of a killed writer are removed by the next holder of the directory's lock (`lock.py`),
except a directory set aside while its replacement was renamed in, which is put back when it is
the only copy left.

Nothing is ever written through a symbolic link planted where the project writes: temporaries are
created with O_EXCL|O_NOFOLLOW, renames replace a link itself (never its target), appended logs are
opened with O_NOFOLLOW and must be regular files."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ..errors import UserError

# why a write failed, for the errors that mean the file system (not the data) is the problem
REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOENT: "the output directory vanished",
}
FULL_MARGIN = 1 << 20  # less free than this after a failed write: the disk filled up
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC  # never through a link


class WriteError(UserError, RuntimeError):
    """The file system refused a write; the message names the path, what was being written and the
    space free. What was published before is intact and no temporary is left behind."""


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


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's data to disk (through a read-only descriptor: Linux allows it)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes free to this user on the file system holding `path` (or its nearest existing parent)."""
    for p in (Path(path), *Path(path).parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def human_bytes(n: float) -> str:
    units = ("B", "KB", "MB", "GB", "TB")
    i = 0
    while abs(n) >= 1000 and i < len(units) - 1:
        n, i = n / 1000, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def _probe(directory: Path) -> int | None:
    """The file system's state after a write failed with no errno (torch's writer reports only
    "unexpected pos"): gone, read-only or full; None when it looks fine."""
    if not directory.is_dir():
        return errno.ENOENT
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return errno.EROFS
    blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail  # root may use the reserved blocks
    return errno.ENOSPC if blocks * st.f_frsize < FULL_MARGIN else None


def fs_errno(exc: BaseException, directory: str | os.PathLike) -> int | None:
    """The file-system error behind `exc`, a failed write into `directory`, or None when the file
    system is not to blame. Writers that hide the OSError (safetensors' "os error 28", torch's
    "unexpected pos") are seen through; must be called before the temporaries are removed."""
    if not isinstance(exc, Exception):
        return None
    directory = Path(directory)
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    if code is None and not isinstance(exc, OSError):
        code = _probe(directory)
    if code == errno.ENOENT and directory.is_dir():
        return None  # a missing input file, not a vanished output directory
    return code if code in REASONS else None


def describe(path: str | os.PathLike, what: str, reason: str, needed: int | None = None) -> str:
    """`path: cannot write WHAT: REASON (X free, at least Y needed)`."""
    free = free_bytes(Path(path).parent)
    space = f"{human_bytes(free)} free" if free is not None else "free space unknown"
    if needed:
        space += f", at least {human_bytes(needed)} needed"
    return f"{path}: cannot write {what}: {reason} ({space})"


def check_space(path: str | os.PathLike, what: str, needed: int) -> None:
    """Refuse before writing anything when `needed` bytes cannot fit beside `path`."""
    free = free_bytes(Path(path).parent)
    if free is not None and free < needed:
        raise WriteError(describe(path, what, "not enough free space", needed))


def write_error(exc: BaseException, path: str | os.PathLike, what: str) -> WriteError | None:
    """A WriteError for `exc` when the file system refused to write `path`; None otherwise."""
    code = fs_errno(exc, Path(path).parent)
    return WriteError(describe(path, what, REASONS[code])) if code is not None else None


def not_regular(path: Path, what: str, exc: OSError | None = None) -> WriteError | None:
    """The WriteError for a path that is a symbolic link, a directory or a special file where the
    project creates a regular file (None for another OSError)."""
    if exc is not None and exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
        return None
    kind = (
        "a symbolic link" if path.is_symlink() else "a directory" if path.is_dir() else "not a regular file"
    )
    return WriteError(
        f"{path}: cannot write {what}: it is {kind}, and nothing is written through one; "
        "remove it (or write elsewhere)"
    )


def fail_cleanly(
    exc: BaseException, path: Path, what: str, cleanup: Callable[[], None], needed: int = 0
) -> None:
    """Remove a failed write's temporaries (`cleanup`); then, if the file system caused `exc`, raise
    a WriteError saying so, with the space free once they are gone."""
    code = fs_errno(exc, path.parent)  # before the cleanup frees what the failed write took
    cleanup()
    if code is not None:
        raise WriteError(describe(path, what, REASONS[code], needed)) from None


class AtomicFile:
    """A temporary file beside `path`, opened for writing as `.file`. `commit()` moves it over `path`
    once it is on disk; `discard()` (or an exception inside a `with` block) removes it. Lets a writer
    stream a large file (a token shard) without ever exposing it half-written. `what` names the
    file in a WriteError."""

    def __init__(self, path: str | os.PathLike, what: str = "a file"):
        self.path, self.what = Path(path), what
        self.tmp = self.path.parent / f".{self.path.name}.{secrets.token_hex(6)}.tmp"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file: BinaryIO = os.fdopen(os.open(self.tmp, NEW_FILE, 0o666), "wb")
        except OSError as e:
            raise write_error(e, self.path, what) or e from None

    def commit(self) -> Path:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except BaseException as e:
            fail_cleanly(e, self.path, self.what, self.discard)
            if isinstance(e, OSError) and (refused := not_regular(self.path, self.what, e)):
                raise refused from None
            raise
        fsync_dir(self.path.parent)
        return self.path

    def discard(self) -> None:
        with contextlib.suppress(OSError):  # buffered bytes the full disk refused: the file goes anyway
            self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            fail_cleanly(exc, self.path, self.what, self.discard)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], what: str = "a file") -> Path:
    """Call write(f) on a temporary file and move it to `path` only once it is complete on disk."""
    with AtomicFile(path, what) as out:
        write(out.file)
    return out.path


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "a file") -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")), what)


def publish_copy(src: str | os.PathLike, path: str | os.PathLike, what: str = "a file") -> Path:
    """Put `src`'s bytes at `path` atomically: a hard link where the file system allows one (a
    downloaded 200 MB shard is not stored twice), else a copy. `src` must never change in place.
    A link's data is fsynced before it is renamed in: whoever wrote `src` (huggingface_hub's
    download) may never have, and a manifest published next would list bytes still in memory. A
    symbolic link (a snapshot of huggingface_hub's cache) is followed: its target is linked."""
    path, src = Path(path), os.path.realpath(src)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        os.link(src, tmp)
    except OSError:  # another file system, or one without hard links: copy
        with AtomicFile(path, what) as out, open(src, "rb") as f:
            shutil.copyfileobj(f, out.file, 1 << 20)
        return path
    try:
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        fail_cleanly(e, path, what, lambda: tmp.unlink(missing_ok=True))
        raise
    fsync_dir(path.parent)
    return path


def fsync_tree(root: Path) -> None:
    """fsync every file and directory below `root` (deepest first), then `root` itself."""
    for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
        if path.is_dir():
            fsync_dir(path)
        else:
            fsync_file(path)
    fsync_dir(root)


def remove_leftovers(directory: str | os.PathLike, name: str = "") -> None:
    """Remove the temporaries (`.NAME.….tmp`, `.NAME.….old`) a killed writer left in `directory`;
    only the holder of the directory's lock may call this, so no live writer loses its files. A
    `.NAME.….old` whose NAME is missing is the only copy left (a writer killed between setting it
    aside and renaming its replacement in): it is put back, not deleted."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    prefix = f".{name}." if name else "."
    for path in sorted(directory.iterdir(), key=lambda p: not p.name.endswith(".old")):
        if path.name.startswith(prefix) and path.name.endswith((".tmp", ".old")):
            original = directory / path.name[1:].rsplit(".", 2)[0]
            if path.name.endswith(".old") and not os.path.lexists(original):
                os.replace(path, original)
                fsync_dir(directory)
            else:
                remove_path(path, ignore_errors=True)


def remove_path(path: Path, ignore_errors: bool = False) -> None:
    """A file, a link (never what it points to: shutil.rmtree refuses links) or a whole directory."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=ignore_errors)
    else:
        path.unlink(missing_ok=True)


class AppendFile:
    """A log that grows by whole lines (metrics.jsonl, samples.txt), each written straight to the
    file: a line the file system refuses is cut off again, so no torn line is left behind for the
    next run to append after."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path, self.what = Path(path), what
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags, 0o666)
        except OSError as e:
            raise write_error(e, self.path, what) or not_regular(self.path, what, e) or e from None
        if stat.S_ISFIFO(os.fstat(self.fd).st_mode):  # a FIFO planted there (a device node needs root)
            os.close(self.fd)
            raise not_regular(self.path, what)

    def write(self, text: str) -> None:
        data = memoryview(text.encode("utf-8"))
        st = os.fstat(self.fd)
        if st.st_nlink == 0:  # deleted, with its directory perhaps: the lines would go nowhere
            raise WriteError(describe(self.path, self.what, REASONS[errno.ENOENT]))
        size = st.st_size
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, size)
            raise write_error(e, self.path, self.what) or e from None

    def close(self) -> None:
        os.close(self.fd)


def _occupied(path: Path) -> bool:
    """Whether a directory cannot simply be renamed onto `path`: a link, a file, a non-empty directory."""
    if path.is_symlink():
        return True
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


class AtomicDir:
    """A directory that appears complete or not at all: files are written into a temporary
    directory beside `path`; `commit()` fsyncs them and renames it into place. An existing target is
    replaced only with `replace=True` (an empty one always may be). `what` names it in a
    WriteError; `needed` (bytes, when known beforehand) is checked against the free space first."""

    def __init__(
        self, path: str | os.PathLike, replace: bool = False, what: str = "a directory", needed: int = 0
    ):
        self.path, self.replace, self.what, self.needed = Path(path), replace, what, needed
        unique = secrets.token_hex(6)
        self.tmp = self.path.parent / f".{self.path.name}.{unique}.tmp"
        self.old = self.path.parent / f".{self.path.name}.{unique}.old"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            check_space(self.path, what, needed)
            self.tmp.mkdir()
        except OSError as e:
            raise write_error(e, self.path, what) or e from None

    def commit(self) -> Path:
        moved = False
        try:
            fsync_tree(self.tmp)
            if _occupied(self.path):
                if not self.replace:
                    raise FileExistsError(f"{self.path}: exists and is not empty")
                os.replace(self.path, self.old)  # a link is moved itself, its target untouched
                moved = True
            os.replace(self.tmp, self.path)  # onto an absent or empty directory
        except BaseException as e:
            if moved and not os.path.lexists(self.path):  # never leave the old copy as a leftover
                os.replace(self.old, self.path)
            fail_cleanly(e, self.path, self.what, self.discard, self.needed)
            raise
        fsync_dir(self.path.parent)
        if moved:
            remove_path(self.old)
        return self.path

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            fail_cleanly(exc, self.path, self.what, self.discard, self.needed)
