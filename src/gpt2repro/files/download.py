"""Downloads that survive a flaky server, for every file the project fetches (hub shards, model
weights, streamed data sets, the assets, the CORE bundle).

A hub under load answers 429 and 5xx, resets connections and stalls mid-body. `retrying` runs any
call until it succeeds, waiting between tries (doubling from `backoff`, jittered, at least what a
`Retry-After` asks) within a bounded number of tries and a total wait; each retry is one line on
stderr, the final give-up one `DownloadError` naming what, how often and the last failure. Only a
transient failure is retried: a 404, a 401 or a full disk ends the call at once.

`download` fetches one URL into a file: bytes go to `.NAME.part` beside it, a retry (or a rerun after
a kill) resumes that partial file with a `Range` request where the server honours one, and the file
is published atomically only once its size and sha256 are the expected ones (a mismatch is retried
from zero, as a corrupted transfer). The policy comes from the environment, checked once:
GPT2REPRO_DOWNLOAD_RETRIES (tries per file, 10), GPT2REPRO_DOWNLOAD_BACKOFF (first wait, 2 s),
GPT2REPRO_DOWNLOAD_MAX_WAIT (waiting in all per file, 900 s), GPT2REPRO_DOWNLOAD_TIMEOUT (a read
that stalls this long fails, 60 s).
"""

from __future__ import annotations

import email.utils
import errno
import os
import random
import shutil
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..errors import UserError
from .fsio import fsync_dir, fsync_file, sha256_file
from .lock import DirLock

T = TypeVar("T")
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
LONGEST_WAIT = 60.0  # one wait at most, unless the server's Retry-After asks for more
CHUNK = 1 << 20


class DownloadError(UserError, RuntimeError):
    """A download failed for good (or cannot start); the message says what and why."""


class HTTPStatus(Exception):
    """A server's answer other than the one asked for."""

    def __init__(self, status: int, url: str, retry_after: float | None = None):
        super().__init__(f"HTTP {status} from {url}")
        self.status, self.retry_after = status, retry_after


class Corrupt(Exception):
    """The bytes received are not the file listed (size or sha256): retried from zero."""


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 10  # tries per file (or call)
    backoff: float = 2.0  # the first wait, doubled after each failure
    max_wait: float = 900.0  # waiting in all, per file, before giving up
    timeout: float = 60.0  # seconds a connection or a read may stall

    @classmethod
    def from_env(cls) -> RetryPolicy:
        values = {}
        for key, kind, low in (("retries", int, 1), ("backoff", float, 0.0), ("max_wait", float, 0.0),
                               ("timeout", float, 0.1)):  # fmt: skip
            name = f"GPT2REPRO_DOWNLOAD_{key.upper()}"
            raw = os.environ.get(name)
            if raw is None:
                continue
            try:
                values[key] = kind(raw)
                if not values[key] >= low or values[key] == float("inf"):
                    raise ValueError
            except ValueError:
                raise DownloadError(f"{name}={raw!r}: must be a {kind.__name__} of at least {low}") from None
        return cls(**values)


PERMANENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


NO_NAME = ("NameResolutionError", "Name or service not known", "name resolution", "nodename nor servname")


def permanent(err: BaseException) -> bool:
    """A failure another try cannot mend: the disk (full, read-only, refused), a certificate, a proxy,
    or a host name that does not resolve (an offline machine: fail now, as before, not in minutes)."""
    names = {c.__name__ for c in type(err).__mro__}
    bad = {"SSLError", "SSLCertVerificationError", "ProxyError", "InvalidURL", "MissingSchema", "gaierror"}
    return (
        bool(names & bad)
        or (isinstance(err, OSError) and err.errno in PERMANENT_ERRNOS)
        or any(words in str(err) for words in NO_NAME)
    )


def _chain(e: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def transient(e: BaseException) -> tuple[str, float | None] | None:
    """(what went wrong, the server's Retry-After) when `e` is worth another try, else None: an HTTP
    status in RETRY_STATUS, a refused or reset connection, a stall, a short body, corrupted bytes."""
    for err in _chain(e):
        if permanent(err):
            return None
        response = getattr(err, "response", None)
        status = err.status if isinstance(err, HTTPStatus) else getattr(response, "status_code", None)
        if isinstance(status, int):
            if status not in RETRY_STATUS:
                return None
            after = err.retry_after if isinstance(err, HTTPStatus) else retry_after(response.headers)
            return f"HTTP {status}", after
        names = {c.__name__ for c in type(err).__mro__}
        if isinstance(err, (ConnectionError, TimeoutError, Corrupt)) or names & {
            "TransportError",  # httpx: refused, reset, stalled, cut short
            "TimeoutException",
            "ConnectionError",  # requests: refused, reset; a stalled read too
            "Timeout",
            "ChunkedEncodingError",  # requests: a body shorter than its length
            "ProtocolError",
            "IncompleteRead",
        }:
            return brief(err)[:200], None
        if isinstance(err, OSError) and "Consistency check failed" in str(
            err
        ):  # huggingface_hub's size check
            return "the file arrived short", None
    return None


def brief(e: BaseException) -> str:
    """An exception in a few words for a one-line error: its type and its message's first line."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def retry_after(headers) -> float | None:
    """A Retry-After header's seconds (a number or an HTTP date), None when absent or unreadable."""
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    return max(0.0, seconds) if seconds < 1e9 else None


def say(line: str) -> None:
    """One line on stderr, above any progress bar (which tqdm then draws again below it)."""
    from tqdm import tqdm

    tqdm.write(f"gpt2repro: {line}", file=sys.stderr)


def backoff(policy: RetryPolicy, attempt: int, after: float | None) -> float:
    """The wait before try `attempt + 1`: doubling from `policy.backoff`, jittered, at most a minute,
    at least what the server's Retry-After asked."""
    delay = min(LONGEST_WAIT, policy.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
    return max(delay, after or 0.0)


def retrying(
    call: Callable[[], T],
    what: str,
    policy: RetryPolicy | None = None,
    progress: Callable[[], int] | None = None,
) -> T:
    """`call()`, tried again after each transient failure (see the module docstring). A failure after
    `progress()` grew (bytes that arrived) starts the count of tries afresh: a slow link that breaks
    every few minutes is still making headway; the total wait stays capped."""
    policy = policy or RetryPolicy.from_env()
    waited, start, attempt = 0.0, time.monotonic(), 0
    done = progress() if progress else 0
    while True:
        attempt += 1
        try:
            return call()
        except Exception as e:
            failure = transient(e)
            if failure is None:
                raise
            if progress and progress() > done:
                done, attempt = progress(), 1
            reason, after = failure
            delay = backoff(policy, attempt, after)
            if attempt >= policy.retries or waited + delay > policy.max_wait:
                asked = f"; the server asked to wait {after:.0f} s" if after and after >= delay else ""
                tries = f"{attempt} {'try' if attempt == 1 else 'tries'}"
                raise DownloadError(
                    f"{what}: gave up after {tries} in {time.monotonic() - start:.0f} s (last: {reason}{asked})"
                ) from None
            say(f"{what}: {reason}; retry {attempt}/{policy.retries - 1} in {delay:.1f} s")
            time.sleep(delay)
            waited += delay


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    size: int | None = None,
    sha256: str | None = None,
    headers: dict[str, str] | None = None,
    what: str | None = None,
    policy: RetryPolicy | None = None,
) -> Path:
    """`url`'s bytes at `dest`, published atomically once they are `size` bytes with `sha256` (when
    given); resumes `.NAME.part` from an earlier try or run. Returns `dest`."""
    dest = Path(dest)
    part = dest.parent / f"{'' if dest.name.startswith('.') else '.'}{dest.name}.part"
    policy = policy or RetryPolicy.from_env()
    with DirLock(dest, "download", beside=True, wait=True):  # one downloader per file (ranks, one asset)
        if _complete(dest, size, sha256):
            return dest  # another process published it while this one waited
        get = {**(headers or {}), "Accept-Encoding": "identity"}  # Range counts the file's own bytes
        grown = lambda: part.stat().st_size if part.exists() else 0  # noqa: E731
        retrying(
            lambda: _fetch_once(url, part, size, sha256, get, policy.timeout), what or url, policy, grown
        )
        fsync_file(part)
        os.replace(part, dest)
        fsync_dir(dest.parent)
    return dest


def _fetch_once(
    url: str, part: Path, size: int | None, sha256: str | None, headers: dict, timeout: float
) -> None:
    """One request: the rest of `part` (all of it when there is none, or the server ignores Range),
    then the whole file checked. Raises HTTPStatus, a connection error or Corrupt."""
    import requests  # tiktoken's dependency too: always installed; drops Authorization on a redirect to another host

    part.touch()
    have = part.stat().st_size
    if url.startswith("file://"):  # a mirror on a shared file system
        with open(urllib.request.url2pathname(url[len("file://") :]), "rb") as src, open(part, "ab") as f:
            src.seek(have)
            shutil.copyfileobj(src, f, CHUNK)
        return _check(part, size, sha256)
    if size is not None and have > size:
        part.unlink()
        have = 0
    if size is None or have < size:
        ranged = {**headers, "Range": f"bytes={have}-"} if have else headers
        with requests.get(url, headers=ranged, stream=True, timeout=timeout) as r:
            span = r.headers.get("Content-Range", "")
            if r.status_code == 416 and have and span == f"bytes */{have}":
                pass  # the partial file is the whole file: checked below
            elif r.status_code not in (200, 206):
                raise HTTPStatus(r.status_code, url, retry_after(r.headers))
            elif r.status_code == 206 and not span.startswith(f"bytes {have}-"):
                part.unlink()
                raise Corrupt(f"asked for bytes {have}- and got {span or 'no Content-Range'}")
            else:
                with open(part, "ab" if r.status_code == 206 else "wb") as f:
                    for chunk in r.iter_content(1 << 16):  # small: a broken transfer keeps all but 64 KiB
                        f.write(chunk)
    _check(part, size, sha256)


def _complete(path: Path, size: int | None, sha256: str | None) -> bool:
    if not path.is_file() or (size is not None and path.stat().st_size != size):
        return False
    return sha256 is None or sha256_file(path) == sha256


def _check(part: Path, size: int | None, sha256: str | None) -> None:
    got = part.stat().st_size
    if size is not None and got != size:
        if got > size:
            part.unlink()
        raise Corrupt(f"{got} bytes arrived, the file has {size}")
    if sha256 is not None:
        got_sha = sha256_file(part)
        if got_sha != sha256:
            part.unlink()
            raise Corrupt(f"sha256 mismatch: expected {sha256}, got {got_sha}")
