"""What every checkpoint directory of a run shares, whichever format holds its tensors (`gathered`:
one set of files; `sharded`: a file per FSDP rank): its name, the manifest covering every file and
its verification, the `latest` pointer and its fallback to the newest checkpoint that verifies,
pruning to the last K, and setting a diverged checkpoint aside."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..files.fsio import atomic_write_text, fsync_dir, remove_path, sha256_file

TIED = "lm_head.weight"  # the same tensor as transformer.wte.weight: stored once
FULL_FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "config.json")
SHARDED_FILES = ("optimizer.json", "config.json")
SHARD = re.compile(r"shard-\d{5}-model-\d{5}-of-\d{5}\.safetensors")  # DCP's name for rank N's file
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
STEP_NAME = re.compile(r"step_\d{8}")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete or corrupted; the message names the file."""


def step_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def rng_state() -> tuple[dict, dict]:
    """(tensor states for rng.pt, JSON-able states for state.json)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    plain = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return tensors, plain


def set_rng_state(tensors: dict, plain: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        # a resume may see fewer GPUs than the save did (8 -> 4): the devices there are
        for device, cuda_state in enumerate(tensors["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def is_sharded(ckpt: Path) -> bool:
    """Whether a checkpoint directory holds DCP shards (an FSDP run's) rather than model.safetensors."""
    return any(SHARD.fullmatch(p.name) for p in ckpt.glob("*.safetensors"))


def publish(final: Path, keep_last: int) -> None:
    """Point `latest` at a checkpoint just renamed into place; remove the ones beyond keep_last."""
    atomic_write_text(final.parent / "latest", final.name + "\n", what="the latest-checkpoint pointer")
    for old in all_steps(final.parent.parent)[:-keep_last]:
        remove_path(old)  # a step that is a planted link: the link goes, never its target


def _manifest_hash(files: dict) -> str:
    content = json.dumps({"format": MANIFEST_FORMAT, "files": files}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(content.encode()).hexdigest()


def write_manifest(ckpt: Path, sums: dict[str, str]) -> None:
    """manifest.json: size and sha256 of each file of `sums`, and the sha256 of that list itself."""
    files = {name: {"bytes": (ckpt / name).stat().st_size, "sha256": sha} for name, sha in sums.items()}
    manifest = {"format": MANIFEST_FORMAT, "files": files, "sha256": _manifest_hash(files)}
    (ckpt / MANIFEST).write_text(json.dumps(manifest, indent=1))


def all_steps(run_dir: str | os.PathLike) -> list[Path]:
    """The run's checkpoint directories, oldest first."""
    return sorted((Path(run_dir) / "checkpoints").glob("step_*"))


def _pointer_target(root: Path) -> Path | None:
    """Where `latest` points, if it names a step directory of this run (never outside it)."""
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not STEP_NAME.fullmatch(name):
        raise CheckpointError(f"{pointer} names {name!r}, not a step_NNNNNNNN directory of this run")
    return root / name


def latest(run_dir: str | os.PathLike, log: Callable[[str], None] = print) -> Path | None:
    """The checkpoint to resume from (see `latest_verified`)."""
    found = latest_verified(run_dir, log)
    return found[0] if found else None


def latest_verified(
    run_dir: str | os.PathLike,
    log: Callable[[str], None] = print,
    check: Callable[[Path, Callable[[str], None]], dict] | None = None,
) -> tuple[Path, dict] | None:
    """The checkpoint to resume from and its verified state.json: the one `latest` points at if it
    verifies, else the newest that does (saying so through `log`); None when there is none yet.
    `check`: how a checkpoint is verified (`verify` by default; `resume` splits the hashing)."""
    root = Path(run_dir) / "checkpoints"
    pointed = _pointer_target(root)
    candidates = all_steps(run_dir)[::-1]
    if pointed is not None:
        candidates = [pointed] + [c for c in candidates if c != pointed]
    problems = []
    for ckpt in candidates:
        try:
            state = (check or verify)(ckpt, log)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:
            log(f"[gpt2repro] warning: {'; '.join(problems)}; using {ckpt.name} instead")
        return ckpt, state
    if problems:
        raise CheckpointError(f"no checkpoint of {run_dir} verifies ({'; '.join(problems)})")
    return None


def read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return content


def check_file(path: Path, sha: str, size: int | None = None, hashed: bool = True) -> None:
    """The file exists at its size and (`hashed`) with its sha256."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (corrupted checkpoint)")
    if (size is not None and path.stat().st_size != size) or (hashed and sha256_file(path) != sha):
        raise CheckpointError(f"{path}: sha256 mismatch (corrupted checkpoint)")


def _verify_manifest(ckpt: Path, hashed: Callable[[str], bool] | None = None) -> None:
    """Every file the manifest lists (all the checkpoint's files) matches it, and it matches itself;
    the files `hashed` leaves out only exist at their sizes."""
    for name, (sha, size) in manifest_files(ckpt).items():
        check_file(ckpt / name, sha, size, hashed=hashed is None or hashed(name))


def manifest_files(ckpt: Path) -> dict[str, tuple[str, int]]:
    """{file name: (sha256, bytes)} of a manifest that matches itself and covers every file."""
    path = ckpt / MANIFEST
    manifest = read_json(path)
    files = manifest.get("files")
    if not isinstance(files, dict) or manifest.get("sha256") != _manifest_hash(files):
        raise CheckpointError(f"{path}: its own sha256 does not match its content (corrupted manifest)")
    sharded = any(SHARD.fullmatch(name) for name in files)
    unlisted = sorted({*(SHARDED_FILES if sharded else FULL_FILES), "state.json"} - set(files))
    # DCP's reader takes every *.safetensors file of the directory: each must be one the manifest vouches for
    unlisted += sorted(p.name for p in ckpt.glob("*.safetensors") if p.name not in files)
    if unlisted:
        raise CheckpointError(f"{path}: does not cover {', '.join(unlisted)} (corrupted manifest)")
    listed = {}
    for name, entry in files.items():
        try:
            listed[name] = (entry["sha256"], entry["bytes"])
        except (KeyError, TypeError):
            raise CheckpointError(f"{path}: its entry for {name!r} is malformed") from None
        if Path(name).name != name:
            raise CheckpointError(f"{path}: names {name!r}, not a file of this checkpoint")
    return listed


def loader_mismatch(loader: dict, step: int) -> str | None:
    """Why the loader position is not where `step` optimizer steps leave it, if it is not: each
    step takes `step_windows` windows, an epoch `epoch_windows` (a finished epoch rolls over at the
    next batch). Loader states of older versions lack what to compare and pass."""
    keys = ("epoch", "consumed", "step_windows", "epoch_windows")
    if any(k not in loader for k in keys):
        return None
    epoch, consumed, windows, per_epoch = (loader[k] for k in keys)
    if not all(isinstance(v, int) and v >= 0 for v in (epoch, consumed, windows, per_epoch)):
        return f"is malformed ({epoch!r}, {consumed!r}, {windows!r}, {per_epoch!r})"
    full, rest = divmod(step * windows, per_epoch) if per_epoch else (0, step * windows)
    if (epoch, consumed) == (full, rest) or (
        rest == 0 and full and (epoch, consumed) == (full - 1, per_epoch)
    ):
        return None
    return f"(epoch {epoch}, {consumed} windows) is not where {step} steps of {windows} windows end"


def _check_consistent(ckpt: Path, state: dict) -> None:
    step = state.get("step")
    where = ckpt / "state.json"
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{where}: step {step!r} is not a step count")
    if STEP_NAME.fullmatch(ckpt.name) and ckpt.name != f"step_{step:08d}":
        raise CheckpointError(f"{where}: step {step} does not match its directory {ckpt.name}")
    problem = loader_mismatch(state.get("loader") or {}, step)
    if problem:
        raise CheckpointError(f"{where}: the loader position {problem}")


def verify(
    ckpt: Path, log: Callable[[str], None] | None = None, hashed: Callable[[str], bool] | None = None
) -> dict:
    """state.json of a complete checkpoint whose files match its manifest and whose step agrees with
    its directory and loader position. A checkpoint of an older version (no manifest) is checked
    against the sha256s in its state.json, which it does not cover: `log` gets a notice saying so.
    `hashed`: which of the manifest's files are hashed (the rest: their sizes); all by default."""
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: no such checkpoint directory")
    legacy = not (ckpt / MANIFEST).is_file()
    if not legacy:
        _verify_manifest(ckpt, hashed)
    state = read_json(ckpt / "state.json")
    if legacy and state.get("manifest"):
        raise CheckpointError(f"{ckpt / MANIFEST}: missing (corrupted checkpoint)")
    if legacy:
        for name, expected in state.get("sha256", {}).items():  # absent in the oldest versions
            check_file(ckpt / name, expected)
    _check_consistent(ckpt, state)
    if legacy:
        (log or stderr)(
            f"[gpt2repro] note: {ckpt} predates checkpoint manifests: its state.json is covered by no "
            "checksum, only checked for consistency; checkpoints written from now on have one"
        )
    return state


def fingerprint(ckpt: Path) -> int:
    """60 bits of the sha256 of the checkpoint's state.json: two copies of one checkpoint agree, two
    checkpoints (other weights, step or loader position) do not."""
    return int(sha256_file(ckpt / "state.json")[:15], 16)


def stderr(message: str) -> None:
    print(message, file=sys.stderr)


def verify_run(run_dir: str | os.PathLike) -> tuple[int, list[str]]:
    """(checkpoints checked, problems found) over every checkpoint of a run."""
    return verify_each(all_steps(run_dir))


def verify_each(ckpts: list[Path]) -> tuple[int, list[str]]:
    """(checkpoints checked, problems found) over `ckpts`."""
    problems = []
    for ckpt in ckpts:
        try:
            verify(ckpt)
        except CheckpointError as e:
            problems.append(str(e))
    return len(ckpts), problems


def is_checkpoint(path: Path) -> bool:
    """Whether `path` is one checkpoint directory (either format), not a run or a data directory."""
    return (path / "model.safetensors").is_file() or (path / "state.json").is_file() or is_sharded(path)


def quarantine(run_dir: str | os.PathLike, step: int) -> Path | None:
    """Rename checkpoint `step` to `diverged_step_…` (its weights made the loss blow up) and point
    `latest` at the newest remaining one; returns that one (None if none is left)."""
    bad = step_dir(run_dir, step)
    root = bad.parent
    if bad.is_dir():
        os.replace(bad, root / f"diverged_{bad.name}")
        fsync_dir(root)
    remaining = all_steps(run_dir)
    if remaining:
        atomic_write_text(root / "latest", remaining[-1].name + "\n")
    else:
        (root / "latest").unlink(missing_ok=True)
    return remaining[-1] if remaining else None
