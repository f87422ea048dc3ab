"""Where `prepare`'s tokens go: shards of the right sizes, and the manifest that lists them with
their sha256s and records, after every shard, where the next one starts in the input, so an
interrupted run resumes from its last complete shard and writes exactly the shards an uninterrupted
run would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .. import __version__
from ..files import assets
from ..files.fsio import WriteError, atomic_write_text, sha256_file
from .shards import ShardWriter, shard_name
from .sources import PrepareError


def open_manifest(out: Path, args: dict, source: str, inputs: list[dict], units: dict) -> dict:
    """A new manifest for `args`, or the earlier run's in `out` when it was made with the same
    arguments, the same cut into units and unchanged inputs (its unfinished shards are removed, to
    be redone)."""
    manifest = {
        "source": source,
        "args": args,
        "units": units,  # how the input is cut into units: the resume point counts them
        "inputs": inputs,
        "tokenizer": {"name": "gpt2", "sha256": assets.REGISTRY["gpt2.tiktoken"].sha256},
        "package_version": __version__,
        "shards": [],
        "documents": 0,
        "total_tokens": 0,
        "next": {"doc": 0, "offset": 0},
        "complete": False,
    }
    previous = read_manifest(out, args)
    if previous is None:
        return manifest
    if not previous.get("complete") and previous.get("units") != manifest["units"]:
        raise PrepareError(
            f"{out} was cut into units another way ({previous.get('units')}; this version: "
            f"{manifest['units']}), so its resume point means nothing here; use a new output directory"
        )
    changed = [new["path"] for old, new in zip(previous.get("inputs", inputs), inputs) if old != new]
    if not previous["complete"] and changed:
        raise PrepareError(
            f"{changed[0]} changed since the interrupted preparation in {out} (size, mtime or content); "
            "resuming would mix old and new text: use a new output directory"
        )
    if not previous.get("complete"):
        drop_unlisted(out, previous)
    return previous


def read_manifest(out: Path, args: dict) -> dict | None:
    """The manifest of an earlier run in `out`, which must have been made with the same `args`;
    None when there is none."""
    path = out / "manifest.json"
    if not path.is_file():
        return None
    try:
        previous = json.loads(path.read_text())
        previous["shards"], previous["complete"]  # noqa: B018 - the keys a resume needs
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PrepareError(
            f"{path}: unreadable manifest ({type(e).__name__}); use a new output directory"
        ) from None
    if previous.get("args") != args:
        raise PrepareError(
            f"{out} holds a preparation with different arguments ({previous.get('args')}); use a new output directory"
        )
    return previous


def drop_unlisted(out: Path, manifest: dict) -> None:
    """Remove the shards and temporary files written after the manifest's last update: redone."""
    for stale in [*out.glob("*.bin"), *out.glob(".*.tmp")]:
        if stale.name not in {s["file"] for s in manifest["shards"]}:
            stale.unlink()


def write_manifest(out: Path, manifest: dict) -> None:
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2), "the manifest")


def finished(out: Path, manifest: dict) -> bool:
    """Whether the manifest is complete, said on stdout: a rerun has nothing to do."""
    if manifest["complete"]:
        shards = f"{manifest['total_tokens']:,} tokens in {len(manifest['shards'])} shards"
        print(f"{out}: already complete ({shards}); nothing to do")
    return manifest["complete"]


def make_out_dir(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrepareError(f"{out}: cannot create the output directory ({e.strerror or e})") from None
    return out


class ShardSink:
    """Where the tokens go: shards of the right size (the val split first, exactly `val_tokens`;
    then train; `max_tokens` caps all), each written to disk as tokens arrive and committed with
    the point to resume from after it recorded in the manifest."""

    def __init__(self, out: Path, manifest: dict, shard_tokens: int, val_tokens: int, max_tokens: int | None):
        self.out, self.manifest = out, manifest
        self.shard_tokens, self.val_tokens, self.max_tokens = shard_tokens, val_tokens, max_tokens
        self.written = manifest["total_tokens"]
        self.shard: ShardWriter | None = None

    @property
    def done(self) -> bool:
        return self.max_tokens is not None and self.written >= self.max_tokens

    def _split(self) -> str:
        return "val" if self.written < self.val_tokens else "train"

    def _target(self) -> int:
        """Size of the shard being filled."""
        if self.written < self.val_tokens:
            size = min(self.shard_tokens, self.val_tokens - self.written)
        else:
            size = self.shard_tokens
        return min(size, self.max_tokens - self.written) if self.max_tokens else size

    def write(self, tokens: np.ndarray) -> int:
        """Append as many of `tokens` as the current shard takes; how many it took."""
        if self.shard is None:
            self.shard = ShardWriter(self.out / shard_name(self._split(), len(self.manifest["shards"])))
        take = min(self._target() - self.shard.count, len(tokens))
        self.shard.write(tokens[:take])
        return take

    @property
    def full(self) -> bool:
        return self.shard is not None and self.shard.count == self._target()

    def commit(self, next_doc: int, next_offset: int, where: dict, final: bool = False) -> None:
        """Commit the shard; the next one starts `next_offset` tokens into document `next_doc`, found
        at `where` in the input (`final`: the input is exhausted and the manifest is complete)."""
        path = self.shard.commit()
        self.manifest["shards"].append(
            {
                "file": path.name,
                "split": self._split(),
                "tokens": self.shard.count,
                "sha256": sha256_file(path),
            }
        )
        self.written += self.shard.count
        self.shard = None
        self.manifest.update(
            total_tokens=self.written,
            documents=next_doc,
            next={"doc": next_doc, "offset": next_offset, **where},
            complete=final,
        )
        self._write_manifest()

    def finish(self, next_doc: int, end: dict) -> None:
        """The input ended (or max_tokens did): commit the partial shard, mark the set complete;
        unless no split but val got a token (nothing prepared is no success), said before the
        manifest is complete, so the same directory can be prepared again."""
        total = self.written + (self.shard.count if self.shard is not None else 0)
        if total <= self.val_tokens and not self.manifest["complete"]:
            self.discard()
            raise empty_split(self.out, "tokens", total, "one shard of --shard-tokens", total // 10)
        if self.shard is not None:
            self.commit(next_doc, 0, end, final=True)
        elif not self.manifest["complete"]:
            self.manifest["complete"] = True
            self._write_manifest()

    def discard(self) -> None:
        if self.shard is not None:
            self.shard.discard()

    def _write_manifest(self) -> None:
        write_manifest(self.out, self.manifest)


def empty_split(out: Path, what: str, total: int, default: str, suggest: int) -> PrepareError:
    """The error of a preparation that left the train split empty: nothing at all, or all `total`
    of `what` held out for validation (--val-tokens, by default `default`); it says what to change
    (`suggest`: a --val-tokens that leaves some to train on)."""
    if not total:
        return PrepareError(f"{out}: nothing prepared: the input holds no {what} to write")
    return PrepareError(
        f"{out}: all {total:,} {what} of the input went to the val split (--val-tokens, by default "
        f"{default}), leaving nothing to train on: prepare again with --val-tokens {suggest}, or more data"
    )


def refused_write(e: OSError | WriteError, out: Path, committed: int) -> PrepareError:
    """A full or read-only disk while writing shards, as one line: what is committed stays valid."""
    why = str(e) if isinstance(e, WriteError) else f"{out}: {e.strerror or e} while writing shards"
    return PrepareError(
        f"{why}; the {committed} shards committed so far are kept: free space and rerun the same command to resume"
    )
