"""A local Hugging Face hub for the tests and `bench prepare`: an HTTP server on 127.0.0.1 (any port) that answers the
requests `huggingface_hub`, `datasets` and our own downloader make of the real hub — a repo's info
and file listing (`/api/{datasets,models}/…`, `tree`, `paths-info`), file resolution with the hub's
headers (`X-Repo-Commit`, `ETag`/`X-Linked-Etag`, `X-Linked-Size`) and ranged reads — and that fails
on purpose. Point code at it with `HF_ENDPOINT=hub.url`, as a user points at a mirror.

Faults (`Faults`) hit the GETs of file contents: 429 with `Retry-After`, 500, 503, a connection
reset mid-body, a body that stalls past the client's timeout, a body shorter than its
`Content-Length`, and bytes that differ from the listed hash. Also any plain URL (`serve_file`),
for the assets and the CORE bundle.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

KINDS = ("429", "500", "503", "reset", "stall", "short", "corrupt")


@dataclass
class Repo:
    repo_id: str
    kind: str  # dataset | model
    files: dict[str, bytes]
    sha: str = ""
    token: str | None = None  # a gated repo: this bearer token or 401

    def __post_init__(self):
        listing = "".join(f"{p}:{hashlib.sha256(b).hexdigest()}" for p, b in sorted(self.files.items()))
        self.sha = self.sha or hashlib.sha1(listing.encode()).hexdigest()

    def tree(self, prefix: str, recursive: bool) -> list[dict]:
        """The hub's tree listing under `prefix`: files and directories, one level or all."""
        base = prefix + "/" if prefix else ""
        below = sorted(p[len(base) :] for p in self.files if p.startswith(base))
        dirs = sorted({"/".join(r.split("/")[: i + 1]) for r in below for i in range(r.count("/"))})
        entries = [
            {"type": "directory", "oid": "0" * 40, "path": base + d}
            for d in dirs
            if recursive or "/" not in d
        ]
        return entries + [self.entry(base + r) for r in below if recursive or "/" not in r]

    def entry(self, path: str) -> dict:
        """A file as the hub's tree/paths-info lists it: every file stored in LFS (its sha256 known)."""
        data = self.files[path]
        oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        lfs = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return {"type": "file", "oid": oid, "size": len(data), "path": path, "lfs": lfs}


@dataclass
class Faults:
    """Which content GETs fail, and how. `plan` is consumed first (one fault a request; None lets one
    through); then every `every`-th request fails with the next of `mix`; `always` fails them all."""

    plan: list[str | None] = field(default_factory=list)
    every: int = 0
    mix: tuple[str, ...] = KINDS
    always: str | None = None
    only: str | None = None  # a substring of the path the faults are limited to
    retry_after: int = 1
    stall_seconds: float = 4.0
    throttle: float = 0.0  # seconds to wait after each 64 KiB of a body (a slow link, for kill tests)
    seen: int = 0
    injected: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next(self, path: str) -> str | None:
        if self.only and self.only not in path:
            return None
        with self.lock:
            self.seen += 1
            if self.plan:
                kind = self.plan.pop(0)
            elif self.always:
                kind = self.always
            elif self.every and self.seen % self.every == 0:
                kind = self.mix[(self.seen // self.every - 1) % len(self.mix)]
            else:
                kind = None
            if kind:
                self.injected[kind] += 1
            return kind


class LocalHub:
    """`with LocalHub() as hub:` — `hub.add(Repo(...))`, `hub.faults = Faults(...)`, `hub.url`."""

    def __init__(self, port: int = 0):
        self.repos: dict[tuple[str, str], Repo] = {}
        self.plain: dict[str, bytes] = {}
        self.faults = Faults()
        self.log: list[
            tuple[str, str, int, str, bool]
        ] = []  # method, path, status, Range, Authorization sent
        self.redirect: str | None = (
            None  # resolve GETs answer 302 to this other server's /blob/SHA256 (a CDN)
        )
        hub = self

        class Handler(_Handler):
            owner = hub

        self.server = _Server(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, repo: Repo) -> Repo:
        self.repos[(repo.kind, repo.repo_id)] = repo
        return repo

    def serve_file(self, path: str, data: bytes) -> str:
        """Serve `data` at a plain URL (no hub API), faults included; returns the URL."""
        self.plain["/" + path.lstrip("/")] = data
        return f"{self.url}/{path.lstrip('/')}"

    def requests(self, needle: str = "") -> list[tuple[str, str, int, str, bool]]:
        return [r for r in self.log if needle in r[1]]

    def __enter__(self) -> LocalHub:
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:  # a client gone mid-request: expected here
        pass


RESOLVE = re.compile(r"^/(?:(datasets|models)/)?([\w.-]+/[\w.-]+)/resolve/([^/]+)/(.+)$")
API = re.compile(
    r"^/api/(datasets|models)/([\w.-]+/[\w.-]+)(?:/(revision|tree|paths-info)/([^/]+)(?:/(.*))?)?$"
)


class _Handler(BaseHTTPRequestHandler):
    owner: LocalHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet; the hub keeps its own log
        pass

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def do_POST(self) -> None:
        self._route(head=False)

    def _route(self, head: bool) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path in self.owner.plain:
            return self._content(self.owner.plain[path], path, head, {})
        m = RESOLVE.match(path)
        if m:
            return self._resolve(("model" if m[1] in (None, "models") else "dataset"), m[2], m[3], m[4], head)
        m = API.match(path)
        if m:
            return self._api(m[1][:-1], m[2], m[3], urllib.parse.unquote(m[4] or ""), m[5] or "")
        self._error(404, "EntryNotFound", f"no route {path}")

    def _repo(self, kind: str, repo_id: str, revision: str) -> Repo | None:
        repo = self.owner.repos.get((kind, repo_id))
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository not found: {repo_id}")
            return None
        if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
            self._error(401, "GatedRepo", "Access to this repo is restricted: pass a token")
            return None
        if revision not in ("", "main", repo.sha):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo

    def _api(self, kind: str, repo_id: str, verb: str | None, revision: str, sub: str) -> None:
        repo = self._repo(kind, repo_id, revision)
        if repo is None:
            return
        if verb == "tree":
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            return self._json(repo.tree(sub.rstrip("/"), query.get("recursive") == ["true"]))
        if verb == "paths-info":
            n = int(self.headers.get("Content-Length") or 0)
            form = urllib.parse.parse_qs(self.rfile.read(n).decode())
            paths = form.get("paths", [])
            body = [repo.entry(p) for p in paths if p in repo.files]
            dirs = {p.rsplit("/", 1)[0] for p in repo.files if "/" in p}
            body += [{"type": "directory", "oid": "0" * 40, "path": p} for p in paths if p in dirs]
            return self._json(body)
        siblings = [
            {
                "rfilename": p,
                "size": len(b),
                "lfs": {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b), "pointerSize": 134},
            }
            for p, b in sorted(repo.files.items())
        ]
        info = {
            "_id": repo.sha[:24],
            "id": repo_id,
            "sha": repo.sha,
            "private": repo.token is not None,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "lastModified": "2026-01-01T00:00:00.000Z",
            "createdAt": "2026-01-01T00:00:00.000Z",
            "siblings": siblings,
            "cardData": {},
        }
        self._json(info)

    def _resolve(self, kind: str, repo_id: str, revision: str, path: str, head: bool) -> None:
        repo = self._repo(kind, repo_id, urllib.parse.unquote(revision))
        if repo is None:
            return
        path = urllib.parse.unquote(path)
        if path not in repo.files:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}", repo.sha)
        data = repo.files[path]
        digest = hashlib.sha256(data).hexdigest()
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{digest}"', "X-Linked-Etag": f'"{digest}"'}
        headers["X-Linked-Size"] = str(len(data))
        if self.owner.redirect and not head:
            return self._error(302, "", "found", extra={"Location": f"{self.owner.redirect}/blob/{digest}"})
        self._content(data, path, head, headers)

    def _content(self, data: bytes, path: str, head: bool, headers: dict) -> None:
        start, end = 0, len(data)
        rng = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        if rng:
            start = int(rng[1])
            end = min(len(data), int(rng[2]) + 1) if rng[2] else len(data)
            if start >= len(data):
                return self._error(
                    416,
                    "RangeNotSatisfiable",
                    "range not satisfiable",
                    extra={"Content-Range": f"bytes */{len(data)}"},
                )
        fault = None if head else self.owner.faults.next(path)
        if fault in ("429", "500", "503"):
            extra = {"Retry-After": str(self.owner.faults.retry_after)} if fault == "429" else {}
            return self._error(int(fault), "Fault", f"injected {fault}", extra=extra)
        body = data[start:end]
        if fault == "corrupt" and body:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        status = 206 if rng else 200
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        self._logged(status)
        if head:
            return
        if fault in ("reset", "stall", "short"):
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            if fault == "stall":
                time.sleep(self.owner.faults.stall_seconds)
            if fault == "reset":  # RST, not FIN: the client sees "connection reset by peer"
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if not self.owner.faults.throttle:
            return self.wfile.write(body)
        for i in range(0, len(body), 1 << 16):
            self.wfile.write(body[i : i + (1 << 16)])
            time.sleep(self.owner.faults.throttle)

    def _logged(self, status: int) -> None:
        auth = "Authorization" in self.headers
        self.owner.log.append((self.command, self.path, status, self.headers.get("Range", ""), auth))

    def _json(self, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self._logged(200)
        self.wfile.write(data)

    def _error(self, status: int, code: str, message: str, commit: str | None = None, extra=None) -> None:
        data = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self._logged(status)
        if self.command != "HEAD":
            self.wfile.write(data)


PARTS = 4  # parquet files the benchmark's data set is cut into


def bench_streamed_prepare(docs: list[str], repeats: int, warmup: bool = True) -> list[dict]:
    """`prepare --source hf:…` streamed from a local hub, fault-free and with every 3rd file request
    failing (429, 500, 503, a reset, a short body in turn), interleaved, `repeats` times after a
    warm-up. Each is a fresh `gpt2repro prepare` process (datasets reads HF_ENDPOINT at import), so
    the seconds are the whole command's, start-up included, the same for both rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = {}
    for i in range(PARTS):  # a data set in several files, as the hub holds one: more requests to fail
        buf = io.BytesIO()
        pq.write_table(pa.table({"text": docs[i::PARTS]}), buf, row_group_size=1000)
        files[f"data/train-{i:05d}-of-{PARTS:05d}.parquet"] = buf.getvalue()
    rows = []
    with LocalHub() as hub, tempfile.TemporaryDirectory() as d:
        hub.add(Repo("bench/docs", "dataset", files))
        env = {
            **os.environ,
            "HF_ENDPOINT": hub.url,
            "HF_HOME": f"{d}/hf",
            "GPT2REPRO_DOWNLOAD_BACKOFF": "0.5",
        }
        times: dict[bool, list[float]] = {False: [], True: []}
        injected, tokens = 0, 0
        for i in range(1 - warmup, repeats + 1):
            for faulty in (False, True):
                mix = ("429", "500", "503", "reset", "short")
                hub.faults = Faults(every=3, mix=mix, only=".parquet") if faulty else Faults()
                out = tempfile.mkdtemp(dir=d)
                argv = [
                    sys.executable,
                    "-m",
                    "gpt2repro",
                    "prepare",
                    "--source",
                    "hf:bench/docs",
                    "--out",
                    out,
                ]
                t0 = time.perf_counter()
                subprocess.run([*argv, "--val-tokens", "0"], env=env, check=True, capture_output=True)
                if i:
                    times[faulty].append(time.perf_counter() - t0)
                    injected += sum(hub.faults.injected.values())
                tokens = json.loads((Path(out) / "manifest.json").read_text())["total_tokens"]
        for faulty in (False, True):
            dt = statistics.median(times[faulty])
            faults = f"1 in 3 file requests ({injected / repeats:.0f} a run)" if faulty else "none"
            rows.append(
                {
                    "source": "hf: (local hub)",
                    "faults": faults,
                    "tokens": tokens,
                    "s": dt,
                    "tok_per_s": tokens / dt,
                }
            )
    return rows
