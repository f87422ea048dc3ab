"""`prepare --source hf-shards:REPO`: shards someone already tokenized with GPT-2 in llm.c's format
(FineWeb and FineWeb-EDU on the Hugging Face hub: kjj0/fineweb10B-gpt2, kjj0/finewebedu10B-gpt2),
downloaded instead of tokenized. A local directory laid out the same way (`hf-shards:/path`) works
offline.

Their names map to ours (`finewebedu_val_000000.bin` → `val_000000.bin`, `…_train_000001.bin` →
`train_000001.bin`). Each shard's header and tokens are checked before it enters the directory,
which it does atomically (a hard link to the downloaded file where possible, so it is not stored
twice), and the manifest lists it with its sha256 as `prepare` does: `verify` and training's
`verify_data` treat both alike. A rerun fetches only the shards the manifest does not list yet.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from .. import __version__
from ..errors import UserError
from ..files import hub
from ..files.fsio import publish_copy, sha256_file
from ..files.lock import DirLock
from ..text.tokenizer import EOT_ID, N_VOCAB
from .shards import HEADER_BYTES, read_shard, shard_name, write_shard
from .sink import drop_unlisted, finished, make_out_dir, read_manifest, write_manifest
from .sources import PrepareError, brief

HF_SHARDS = "hf-shards:"
SHARD = re.compile(r"(?:^|_)(train|val)_(\d+)\.bin$")  # llm.c's names: fineweb_train_000001.bin
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
CHUNK_TOKENS = 1 << 23  # tokens checked at a time (16 MB)


class Remote(NamedTuple):
    """Where the shards come from: a hub data set at one commit, or a local directory."""

    label: str  # hf-shards:SPEC, for messages
    listing: hub.RepoFiles | None  # the hub data set's files; None for a local directory
    root: Path | None  # the local directory
    commit: str | None  # the hub commit every file is downloaded at, recorded for a rerun
    files: list[str]  # its .bin files, relative to the repo or the directory


class Planned(NamedTuple):
    source: str  # the file in the remote
    file: str  # our name for it
    split: str


def is_hub_shards(sources: list[str]) -> bool:
    return any(s.startswith(HF_SHARDS) for s in sources)


def fetch_shards(
    sources: list[str],
    out_dir: str | os.PathLike,
    max_shards: int | None = None,
    val_tokens: int | None = None,
    revision: str | None = None,
    progress: bool = True,
) -> dict:
    """Fetch the val shards (cut to `val_tokens` if given) and the first `max_shards` train shards
    (all by default) of one `hf-shards:` source into `out_dir`; returns the manifest."""
    if len(sources) != 1:
        raise PrepareError(f"{HF_SHARDS} takes one source at a time, not {len(sources)}")
    out = make_out_dir(out_dir)
    args = {"source": sources[0], "revision": revision, "max_shards": max_shards, "val_tokens": val_tokens}
    with DirLock(out, "prepare"):  # one writer per data directory
        manifest = _open_manifest(out, args)
        if finished(out, manifest):
            return manifest
        remote = _locate(sources[0], revision, manifest["commit"])
        plan = _plan(remote, max_shards, val_tokens)
        manifest["commit"] = remote.commit
        write_manifest(out, manifest)  # before any shard: every shard in `out` is then one it lists
        _fetch_all(out, remote, plan, manifest, val_tokens, progress)
    return manifest


def resume_command(out: Path, args: dict) -> str:
    """The command that resumes this preparation, for a give-up's message."""
    words = ["gpt2repro", "prepare", "--source", args["source"], "--out", str(out)]
    for key in ("max_shards", "val_tokens", "revision"):
        if args.get(key) is not None:
            words += [f"--{key.replace('_', '-')}", str(args[key])]
    return shlex.join(words)


def _open_manifest(out: Path, args: dict) -> dict:
    """The earlier run's manifest (made with the same arguments; files it does not list removed), or
    a new one for a directory holding no shards."""
    previous = read_manifest(out, args)
    if previous is not None:
        if not previous["complete"]:
            drop_unlisted(out, previous)  # published just before a crash, not listed yet: redone
        return previous
    strays = sorted(p.name for p in out.glob("*.bin"))
    if strays:
        raise PrepareError(
            f"{out}: holds shards no manifest lists ({strays[0]}, ...); use a new output directory"
        )
    return {
        "source": args["source"],
        "args": args,
        "commit": None,
        "tokenizer": {"name": "gpt2"},
        "package_version": __version__,
        "shards": [],
        "documents": 0,
        "total_tokens": 0,
        "complete": False,
    }


def _locate(label: str, revision: str | None, commit: str | None) -> Remote:
    """The source's .bin files: a local directory's, or the hub data set's at `commit` (a rerun's),
    else at `revision`."""
    spec = label[len(HF_SHARDS) :]
    try:
        root = Path(spec).expanduser()
    except RuntimeError:  # ~nosuchuser
        raise PrepareError(f"{label}: {spec.split('/')[0]} names no user's home directory") from None
    if spec and root.is_dir():
        if revision:
            raise PrepareError(f"revision is for hub data sets; {spec} is a local directory")
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*.bin") if p.is_file())
        return Remote(label, None, root, None, files)
    if not REPO_ID.match(spec):
        raise PrepareError(f"{label}: no such directory, and not a hub data set's name (OWNER/NAME)")
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise PrepareError(f"{HF_SHARDS} needs huggingface_hub: pip install 'gpt2repro[data]'") from None
    why = hub.unreachable()
    if why:
        raise PrepareError(
            f"cannot download {spec} from the Hugging Face hub ({why}); offline machines: download its "
            f".bin files elsewhere and pass {HF_SHARDS}/path/to/them"
        )
    try:
        listing = hub.list_files(spec, "dataset", commit or revision)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - no such data set, no access: all one line
        raise PrepareError(f"{label}: cannot list the data set on the hub ({brief(e)})") from None
    files = sorted(f for f in listing.files if f.endswith(".bin"))
    return Remote(label, listing, None, listing.commit, files)


def _plan(remote: Remote, max_shards: int | None, val_tokens: int | None) -> list[Planned]:
    """The val shards (none when val_tokens is 0), then the first `max_shards` train shards, by
    their numbers, each with our name."""
    found: dict[str, list[tuple[int, str]]] = {"val": [], "train": []}
    for f in remote.files:
        m = SHARD.search(Path(f).name)
        if m:
            found[m[1]].append((int(m[2]), f))
    if not found["train"]:
        raise PrepareError(f"{remote.label}: no llm.c shards in it (files like fineweb_train_000001.bin)")
    if not found["val"] and val_tokens != 0:
        raise PrepareError(
            f"{remote.label}: no val shard in it (like fineweb_val_000000.bin); --val-tokens 0 goes without"
        )
    chosen = {
        "val": sorted(found["val"]) if val_tokens != 0 else [],
        "train": sorted(found["train"])[:max_shards],
    }
    plan = [Planned(f, shard_name(split, n), split) for split, group in chosen.items() for n, f in group]
    names = [p.file for p in plan]
    for p in plan:
        if names.count(p.file) > 1:
            twins = [q.source for q in plan if q.file == p.file]
            raise PrepareError(
                f"{remote.label}: {twins[0]} and {twins[1]} would both be {p.file}; pass a directory holding one set"
            )
    return plan


def _fetch_all(
    out: Path, remote: Remote, plan: list[Planned], manifest: dict, val_tokens: int | None, progress: bool
) -> None:
    """Fetch the planned shards the manifest does not list yet, writing it after each one."""
    resume = f"rerun the same command to resume ({resume_command(out, manifest['args'])})"
    listed = {s["file"] for s in manifest["shards"]}
    val_left = None
    if val_tokens is not None:
        val_left = val_tokens - sum(s["tokens"] for s in manifest["shards"] if s["split"] == "val")
    for item in tqdm(plan, desc="prepare", unit="shard", disable=not progress):
        cap = val_left if item.split == "val" else None
        if item.file in listed or cap == 0:
            continue
        entry, documents = _fetch(out, remote, item, cap, resume)
        if cap is not None:
            val_left -= entry["tokens"]
        manifest["shards"].append(entry)
        manifest["documents"] += documents
        manifest["total_tokens"] += entry["tokens"]
        write_manifest(out, manifest)
    manifest["complete"] = True
    write_manifest(out, manifest)


def _fetch(out: Path, remote: Remote, item: Planned, cap: int | None, resume: str) -> tuple[dict, int]:
    """Download (or find) one shard, check it and publish it in `out` under our name, cut to `cap`
    tokens if it has more: its manifest entry and the documents starting in it."""
    src = _download(out, remote, item, resume)
    tokens = read_shard(src)  # the header: magic, version, token count against the file's size
    path = out / item.file
    if cap is not None and cap < len(tokens):
        tokens = tokens[:cap]
        documents = _scan(src, tokens, None)
        write_shard(path, tokens)  # a new header with the new count
        sha = sha256_file(path)
    else:  # a download was checked against the hub's sha256 of the file: not hashed again
        sha = remote.listing.files.get(item.source, (None, None))[1] if remote.listing else None
        h = None if sha else hashlib.sha256()
        documents = _scan(src, tokens, h)
        sha = sha or h.hexdigest()
        publish_copy(src, path, "a token shard")
    if remote.root is None:
        src.unlink()  # the download, now linked in under our name (or cut)
    entry = {
        "file": item.file,
        "split": item.split,
        "tokens": len(tokens),
        "sha256": sha,
        "from": item.source,
    }
    return entry, documents


def _download(out: Path, remote: Remote, item: Planned, resume: str) -> Path:
    """The shard as the source holds it: the local file, or the hub's, downloaded into `out` (a
    hidden file until it is published under our name)."""
    if remote.root is not None:
        return remote.root / item.source
    try:
        return hub.fetch_file(remote.listing, item.source, out / f".{item.file}.download")
    except UserError as e:
        raise PrepareError(f"{remote.label}: {e}; the shards fetched so far are kept: {resume}") from None
    except Exception as e:  # noqa: BLE001 - a 404, no access, the disk: all one line
        raise PrepareError(
            f"{remote.label}: cannot download {item.source} ({brief(e)}); the shards fetched so far are kept: {resume}"
        ) from None


def _scan(path: Path, tokens: np.ndarray, h: hashlib._Hash | None) -> int:
    """One read of a shard's tokens: each checked to be GPT-2's (< 50257), the documents starting in
    them (<|endoftext|> each) counted; `h` (a sha256, or None) is fed the file holding them after
    `path`'s header."""
    if h is not None:
        with open(path, "rb") as f:
            h.update(f.read(HEADER_BYTES))
    documents = 0
    for start in range(0, len(tokens), CHUNK_TOKENS):
        chunk = np.asarray(tokens[start : start + CHUNK_TOKENS])
        if chunk.max() >= N_VOCAB:
            bad = int(np.argmax(chunk >= N_VOCAB))
            raise PrepareError(
                f"{path}: token {start + bad} is {chunk[bad]}, not a GPT-2 token (ids < {N_VOCAB})"
            )
        documents += int(np.count_nonzero(chunk == EOT_ID))
        if h is not None:
            h.update(chunk.tobytes())
    return documents
