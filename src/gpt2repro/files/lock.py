"""One writer per output directory: `train`, `prepare` and `export` hold an exclusive `flock` on a
lock file for as long as they write, so a second writer (another terminal, a requeued job while the
old one still runs) stops at once with a line naming the holder, instead of interleaving its files.

The OS drops the lock when the holder dies, so kill -9 never leaves a stale lock; the file itself,
removed on release, may be left behind, and means nothing while unlocked. Forked children (the
tokenizer pool, compile workers) close their copy, so a holder killed while they run frees it too.
Readers (`eval`, `sample`, `verify`, `plot`) never take it. On network file systems the lock is only
as good as the server's lock manager (see the README).

The lock is taken on the directory's resolved path, so two writers naming one directory through
different paths (a symbolic link, `..`) exclude each other. The lock file itself is never followed
when it is a symbolic link (O_NOFOLLOW) and must be a regular file: a link planted in a shared
directory cannot make a writer overwrite the file it points to."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path

from ..errors import UserError
from .fsio import write_error

LOCK_NAME = ".gpt2repro.lock"
# never through a final symbolic link; O_NONBLOCK: a FIFO planted there does not block the open
LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_HELD: set[int] = set()  # lock file descriptors of this process, closed in forked children


def _close_in_child() -> None:
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class LockError(UserError, RuntimeError):
    """Another process is writing to the same directory; the message names it."""


def _holder(fd: int) -> str:
    """Who holds the lock, from what it wrote into the file."""
    for _ in range(20):  # the holder writes its name just after it locks
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode())
            return f"gpt2repro {info['command']} (pid {info['pid']} on {info['host']}, started {info['started']})"
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "a process that did not say who it is"


class DirLock:
    """An exclusive lock on `directory` for `command`, for a `with` block. The lock file is
    `directory/.gpt2repro.lock`, or `.NAME.lock` beside it with `beside=True` (an export's directory
    must stay empty until it is published; a file being downloaded); created if needed, removed on
    release. Held already: a LockError naming the holder, or with `wait=True` a wait for it."""

    def __init__(self, directory: str | os.PathLike, command: str, beside: bool = False, wait: bool = False):
        self.directory, self.command, self.wait = Path(directory), command, wait
        real = Path(os.path.realpath(directory))  # one lock per directory, whatever the path to it
        self.path = real.parent / f".{real.name}.lock" if beside else real / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> DirLock:
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise LockError(
                f"{self.path.parent} exists and is not a directory; name a directory to write into"
            )
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, LOCK_FLAGS, 0o666)
                if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a device planted there
                    os.close(fd)
                    raise OSError(errno.ENXIO, "not a regular file")
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                    raise self._not_a_file() from None
                raise write_error(e, self.path, f"the {self.command} lock") or e from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise LockError(
                    f"{self.directory} is being written by {holder}; wait for it to end, or write elsewhere"
                ) from None
            except OSError as e:  # a file system without locks (some FUSE mounts): write unguarded
                print(
                    f"[gpt2repro] warning: {self.directory}: this file system does not lock files "
                    f"({e.strerror}); a second writer would not be stopped",
                    file=sys.stderr,
                )
                break
            if self._still_mine(fd):
                break
            os.close(fd)  # its holder removed the file as we locked it: lock the new one
        self.fd = fd
        _HELD.add(fd)
        info = {
            "command": self.command,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        with contextlib.suppress(OSError):  # a full disk: the lock holds, only the name is missing
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        return self

    def _not_a_file(self) -> LockError:
        kind = (
            "a symbolic link"
            if self.path.is_symlink()
            else "a directory"
            if self.path.is_dir()
            else "a special file"
        )
        return LockError(
            f"{self.path}: the lock file is {kind}, not a regular file; nothing is written through it: "
            "remove it if no other program uses it, or write elsewhere"
        )

    def _still_mine(self, fd: int) -> bool:
        try:
            on_disk = os.lstat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still locked: a waiting writer then locks a new file
        _HELD.discard(self.fd)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release()
