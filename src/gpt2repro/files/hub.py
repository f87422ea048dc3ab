"""The Hugging Face hub as every part of the project reaches it: at `HF_ENDPOINT` (a mirror on any
port), with `HF_TOKEN` for gated and private repos (sent, never printed or recorded), each call
retried as `download.retrying` retries (429, 5xx, resets, stalls).

Data set files (shards) are downloaded by `download.download` straight into the output directory,
resumable across tries and runs and checked against the sha256 the hub lists; model files go
through `huggingface_hub`'s own cache (shared with transformers), checked the same way afterwards.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
import urllib.request
from pathlib import Path
from typing import NamedTuple

from .download import Corrupt, DownloadError, RetryPolicy, download, retrying
from .fsio import sha256_file

DEFAULT_ENDPOINT = "https://huggingface.co"


class RepoFiles(NamedTuple):
    repo: str
    kind: str  # dataset | model
    commit: str  # the commit every file is fetched at
    files: dict[str, tuple[int | None, str | None]]  # path -> (size, sha256 where the hub lists one)


def endpoint() -> str:
    """HF_ENDPOINT, read at each call (huggingface_hub reads it once, at its import)."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    return any(os.environ.get(k, "0") not in ("0", "") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def unreachable() -> str | None:
    """Why the hub cannot be reached, found in seconds (datasets itself retries for ~25 s): offline
    mode, or no connection to HF_ENDPOINT's host on its own port."""
    if offline():
        return "offline mode is set (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
    url = urllib.parse.urlsplit(endpoint())
    if urllib.request.getproxies().get(url.scheme) and not urllib.request.proxy_bypass(url.hostname or ""):
        return None  # only the proxy is reachable: the requests themselves tell
    try:
        port = url.port or (80 if url.scheme == "http" else 443)
    except ValueError:
        return f"HF_ENDPOINT {endpoint()!r} has no valid port"
    if not url.hostname:
        return f"HF_ENDPOINT {endpoint()!r} is not a URL"
    try:
        socket.create_connection((url.hostname, port), timeout=5).close()
    except OSError as e:
        return f"{url.hostname}:{port} unreachable: {e}"
    return None


def token() -> str | None:
    """HF_TOKEN, or the token `hf auth login` saved."""
    from huggingface_hub import get_token

    return get_token()


def auth() -> dict[str, str]:
    t = token()
    return {"Authorization": f"Bearer {t}"} if t else {}


def file_url(repo: str, kind: str, commit: str, path: str) -> str:
    prefix = "datasets/" if kind == "dataset" else ""
    quoted = urllib.parse.quote(path)
    return f"{endpoint()}/{prefix}{repo}/resolve/{urllib.parse.quote(commit, safe='')}/{quoted}"


def list_files(repo: str, kind: str, revision: str | None, policy: RetryPolicy | None = None) -> RepoFiles:
    """The repo's files at `revision` (its commit, each file's size and sha256), listed with retries.
    Errors other than transient ones propagate (the caller names them)."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint(), token=token() or False)
    get = api.dataset_info if kind == "dataset" else api.model_info
    info = retrying(lambda: get(repo, revision=revision, files_metadata=True), f"listing {repo}", policy)
    files = {}
    for s in info.siblings or []:
        lfs = getattr(s, "lfs", None)
        files[s.rfilename] = (getattr(s, "size", None), getattr(lfs, "sha256", None) if lfs else None)
    return RepoFiles(repo, kind, info.sha, files)


def fetch_file(listing: RepoFiles, path: str, dest: Path, policy: RetryPolicy | None = None) -> Path:
    """One data set file into `dest` (resumable, checked, atomic): see `download.download`."""
    size, sha = listing.files.get(path, (None, None))
    url = file_url(listing.repo, listing.kind, listing.commit, path)
    return download(url, dest, size=size, sha256=sha, headers=auth(), what=path, policy=policy)


def cached_file(listing: RepoFiles, path: str, policy: RetryPolicy | None = None) -> Path:
    """One model file through huggingface_hub's cache, retried; once fetched, its sha256 checked
    against the listing (a mismatch is deleted and fetched again)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    size, sha = listing.files.get(path, (None, None))
    cached = try_to_load_from_cache(listing.repo, path, revision=listing.commit)
    if isinstance(cached, str):  # in the cache already (checked when we fetched it): not hashed again
        return Path(cached)

    def once() -> Path:
        got = Path(
            hf_hub_download(
                listing.repo, path, revision=listing.commit, endpoint=endpoint(), token=token() or False
            )
        )
        if sha is not None and sha256_file(got) != sha:
            blob = got.resolve()
            got.unlink(missing_ok=True)
            blob.unlink(missing_ok=True)
            raise Corrupt(f"{path}: its sha256 differs from the one the hub lists")
        return got

    return retrying(once, path, policy)


def cached_offline(repo: str, path: str, revision: str | None) -> Path:
    """A model file already in huggingface_hub's cache (HF_HUB_OFFLINE): no network call."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, path, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: one line
        raise DownloadError(
            f"{repo}: {path} is not in the Hugging Face cache, and offline mode is set"
        ) from None
