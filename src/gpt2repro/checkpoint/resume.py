"""The checkpoint a run resumes from, the same on every rank: the newest that verifies, agreed in
one collective (nodes without shared storage each look in their own directory), or every rank stops
naming the ones that differ.

FSDP's ranks share one directory (sharded checkpoints need it), so they split the hashing of its
large files (for gpt3-2.7b ~33 GB, once instead of once per rank): every rank checks each file's
size and hashes the JSON files it reads itself, then hashes its share of the rest; a corrupted file
found by any rank sends every rank to the next older checkpoint together. This module is the one
place that knows the split."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from ..config.schema import TrainConfig
from ..parallel.distributed import DistInfo, agree, all_reduce_sum
from .ckptdir import CheckpointError, check_file, fingerprint, latest_verified, manifest_files, verify


def find(
    run_dir: Path, cfg: TrainConfig, info: DistInfo, log: Callable[[str], None]
) -> tuple[Path, dict] | None:
    """The checkpoint to resume from and its state.json, the same on every rank; None for a fresh
    start. Raises `DisagreementError` when the ranks found different ones."""
    split = cfg.fsdp and info.distributed
    refused: dict[Path, str] = {}  # checkpoints a rank's share found corrupted, with why
    while True:
        found = _agreed(run_dir, cfg, info, log, _checker(split, refused))
        if found is None or not split:
            return found
        problem = _verify_share(found[0], info.rank, info.world_size)
        if not all_reduce_sum([float(problem is not None)], info.device)[0]:
            return found
        problems: list[str | None] = [None] * info.world_size
        dist.all_gather_object(problems, problem)  # whichever rank found it, rank 0 says which file
        refused[found[0]] = next(p for p in problems if p)


def _read_by_every_rank(name: str) -> bool:
    return name.endswith(".json")


def _checker(split: bool, refused: dict[Path, str]) -> Callable[[Path, Callable[[str], None]], dict]:
    """How `latest_verified` checks a checkpoint: whole, or (`split`) all but the large files' hashes,
    and the ones refused already refused again with their reason."""

    def check(ckpt: Path, log: Callable[[str], None]) -> dict:
        if ckpt in refused:
            raise CheckpointError(refused[ckpt])
        return verify(ckpt, log, hashed=_read_by_every_rank if split else None)

    return check


def _verify_share(ckpt: Path, rank: int, world: int) -> str | None:
    """Hash this rank's share of a checkpoint's large files: what does not match, or None."""
    try:
        files = manifest_files(ckpt)
        for name in [n for n in sorted(files) if not _read_by_every_rank(n)][rank::world]:
            check_file(ckpt / name, *files[name])
    except CheckpointError as e:
        return str(e)
    return None


def _agreed(
    run_dir: Path, cfg: TrainConfig, info: DistInfo, log: Callable[[str], None], check: Callable
) -> tuple[Path, dict] | None:
    """The newest checkpoint that `check` passes, the same on every rank, or all ranks stop."""
    quiet = log if info.is_main else (lambda message: None)
    found, problem = None, None
    try:
        if cfg.resume != "never":
            found = latest_verified(run_dir, quiet, check)
    except CheckpointError as e:  # every rank must still reach the agreement
        problem = e
    key = (-2 if problem else -1, 0) if found is None else (found[1]["step"], fingerprint(found[0]))
    agree(info, key, "the checkpoint to resume from", _describe)
    if problem is not None:
        raise problem
    return found


def _describe(key: tuple) -> str:
    if key[0] < 0:
        return "no checkpoint that verifies" if key[0] == -2 else "no checkpoint (fresh start)"
    return f"step {key[0]} (state {key[1]:015x})"
