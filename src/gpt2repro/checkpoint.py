"""Training checkpoints: written atomically, the last K kept, a `latest` pointer updated last.

Layout of RUN_DIR/checkpoints/step_XXXXXXXX/:
  model.safetensors  weights (our layout; the tied lm_head stored once)
  optimizer.pt       optimizer state, all optimizers of the run (tensors and numbers: weights_only=True)
  rng.pt             torch (and CUDA) RNG states
  config.json        the resolved TrainConfig
  state.json         step, loader position, python/numpy RNG, world size, last metrics (and the sha256s
                     of the files above, for older versions of this package)
  manifest.json      the size and sha256 of every file above, state.json included, and a sha256 of
                     its own content: verified on every load, with the step in state.json, the
                     directory's name and the loader position checked to agree
A checkpoint is built in a hidden temporary directory and renamed into place (`fsio.AtomicDir`), so
a crash or a full disk mid-write never touches the previous one; `latest` moves only after the rename. When `latest` is missing or broken, the newest checkpoint
that verifies is used instead. A checkpoint whose weights turned out to diverge is renamed
`diverged_step_…` (kept, never resumed from).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .config import TrainConfig
from .distributed import DistInfo, all_reduce_sum
from .errors import UserError
from .fsio import (
    REASONS,
    AtomicDir,
    WriteError,
    atomic_write_text,
    describe,
    free_bytes,
    fsync_dir,
    human_bytes,
    remove_leftovers,
    sha256_file,
)
from .lock import DirLock, LockError
from .model import GPT, WeightsMismatch, load_state_strict

TIED = "lm_head.weight"
CHECKSUMMED = ("model.safetensors", "optimizer.pt", "rng.pt", "config.json")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
STEP_NAME = re.compile(r"step_\d{8}")
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete or corrupted; the message names the file."""


def step_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def gather(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state on CPU. Under FSDP every rank must call this."""
    return get_model_state_dict(model, options=FULL), get_optimizer_state_dict(
        model, optimizers, options=FULL
    )


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
        torch.cuda.set_rng_state_all(tensors["cuda"])
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save(
    run_dir: str | os.PathLike,
    step: int,
    model_state: dict,
    optim_state: dict,
    state: dict,
    config: TrainConfig,
    keep_last: int,
) -> Path:
    """Write checkpoint `step` (rank 0 only), point `latest` at it, prune older ones beyond keep_last."""
    final = step_dir(run_dir, step)
    root = final.parent
    if not Path(run_dir).is_dir():  # deleted under a running job: do not quietly make a new one
        raise WriteError(describe(final, f"checkpoint step {step}", REASONS[errno.ENOENT]))
    weights = {k: v.contiguous() for k, v in model_state.items() if k != TIED}
    tensors, plain = rng_state()
    needed = tensor_bytes(weights) + tensor_bytes(optim_state)
    # re-saving the same step (e.g. after a resume) replaces it whole
    with AtomicDir(final, replace=True, what=f"checkpoint step {step}", needed=needed) as tmp:
        (tmp / "model.safetensors").write_bytes(safetensors_bytes(weights, metadata={"format": "pt"}))
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save(tensors, tmp / "rng.pt")
        (tmp / "config.json").write_text(config.to_json())
        sums = {name: sha256_file(tmp / name) for name in CHECKSUMMED}
        content = {**state, "step": step, "rng": plain, "sha256": sums, "manifest": MANIFEST}
        (tmp / "state.json").write_text(json.dumps(content))
        write_manifest(tmp, {**sums, "state.json": sha256_file(tmp / "state.json")})
    atomic_write_text(root / "latest", final.name + "\n", what="the latest-checkpoint pointer")
    for old in all_steps(run_dir)[:-keep_last]:
        shutil.rmtree(old)
    return final


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) state dict: what its file needs at least."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


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
    run_dir: str | os.PathLike, log: Callable[[str], None] = print
) -> tuple[Path, dict] | None:
    """The checkpoint to resume from and its verified state.json: the one `latest` points at if it
    verifies, else the newest that does (saying so through `log`); None when there is none yet."""
    root = Path(run_dir) / "checkpoints"
    pointed = _pointer_target(root)
    candidates = all_steps(run_dir)[::-1]
    if pointed is not None:
        candidates = [pointed] + [c for c in candidates if c != pointed]
    problems = []
    for ckpt in candidates:
        try:
            state = verify(ckpt, log)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:
            log(f"[gpt2repro] warning: {'; '.join(problems)}; using {ckpt.name} instead")
        return ckpt, state
    if problems:
        raise CheckpointError(f"no checkpoint of {run_dir} verifies ({'; '.join(problems)})")
    return None


def _read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return content


def _check_file(path: Path, sha: str, size: int | None = None) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (corrupted checkpoint)")
    if (size is not None and path.stat().st_size != size) or sha256_file(path) != sha:
        raise CheckpointError(f"{path}: sha256 mismatch (corrupted checkpoint)")


def _verify_manifest(ckpt: Path) -> None:
    """Every file the manifest lists (all the checkpoint's files) matches it, and it matches itself."""
    path = ckpt / MANIFEST
    manifest = _read_json(path)
    files = manifest.get("files")
    if not isinstance(files, dict) or manifest.get("sha256") != _manifest_hash(files):
        raise CheckpointError(f"{path}: its own sha256 does not match its content (corrupted manifest)")
    unlisted = sorted({*CHECKSUMMED, "state.json"} - set(files))
    if unlisted:
        raise CheckpointError(f"{path}: does not cover {', '.join(unlisted)} (corrupted manifest)")
    for name, entry in files.items():
        try:
            sha, size = entry["sha256"], entry["bytes"]
        except (KeyError, TypeError):
            raise CheckpointError(f"{path}: its entry for {name!r} is malformed") from None
        if Path(name).name != name:
            raise CheckpointError(f"{path}: names {name!r}, not a file of this checkpoint")
        _check_file(ckpt / name, sha, size)


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


def verify(ckpt: Path, log: Callable[[str], None] | None = None) -> dict:
    """state.json of a complete checkpoint whose files match its manifest and whose step agrees with
    its directory and loader position. A checkpoint of an older version (no manifest) is checked
    against the sha256s in its state.json, which it does not cover: `log` gets a notice saying so."""
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: no such checkpoint directory")
    legacy = not (ckpt / MANIFEST).is_file()
    if not legacy:
        _verify_manifest(ckpt)
    state = _read_json(ckpt / "state.json")
    if legacy and state.get("manifest"):
        raise CheckpointError(f"{ckpt / MANIFEST}: missing (corrupted checkpoint)")
    if legacy:
        for name, expected in state.get("sha256", {}).items():  # absent in the oldest versions
            _check_file(ckpt / name, expected)
    _check_consistent(ckpt, state)
    if legacy:
        (log or _stderr)(
            f"[gpt2repro] note: {ckpt} predates checkpoint manifests: its state.json is covered by no "
            "checksum, only checked for consistency; checkpoints written from now on have one"
        )
    return state


def fingerprint(ckpt: Path) -> int:
    """60 bits of the sha256 of the checkpoint's state.json: two copies of one checkpoint agree, two
    checkpoints (other weights, step or loader position) do not."""
    return int(sha256_file(ckpt / "state.json")[:15], 16)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def verify_run(run_dir: str | os.PathLike) -> tuple[int, list[str]]:
    """(checkpoints checked, problems found) over every checkpoint of a run."""
    steps = all_steps(run_dir)
    problems = []
    for ckpt in steps:
        try:
            verify(ckpt)
        except CheckpointError as e:
            problems.append(str(e))
    return len(steps), problems


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


def resolve(path: str | os.PathLike) -> Path:
    """A verified checkpoint directory from a run directory, its checkpoints/ folder or the step
    directory itself."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        verify(path)
        return path
    run_dir = path.parent if path.name == "checkpoints" else path
    found = latest(run_dir, log=_stderr) if (run_dir / "checkpoints").is_dir() else None
    if found is not None:
        return found
    raise CheckpointError(
        f"{path}: not a checkpoint (no model.safetensors) and no run with a latest checkpoint"
    )


def read_config(ckpt: Path) -> TrainConfig:
    try:
        return TrainConfig.from_dict(json.loads((ckpt / "config.json").read_text()))
    except (OSError, json.JSONDecodeError, TypeError, KeyError) as e:
        raise CheckpointError(f"{ckpt / 'config.json'}: unreadable config ({e})") from None


def read_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    try:
        weights = load_file(ckpt / "model.safetensors")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{ckpt / 'model.safetensors'}: corrupted or unreadable ({e})") from None
    weights[TIED] = weights["transformer.wte.weight"]
    return weights


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> GPT:
    """A GPT with the weights of a checkpoint (run dir or step dir), for eval, sampling and export."""
    ckpt = resolve(path)
    model = GPT(read_config(ckpt).model)
    try:
        load_state_strict(model, read_weights(ckpt))
    except WeightsMismatch as e:
        raise CheckpointError(f"{ckpt}: weights do not fit the model ({e})") from None
    return model.to(device)


def load_training(
    ckpt: Path, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], state: dict | None = None
) -> dict:
    """Restore model, optimizer and RNG in place (all ranks); returns state.json's contents.
    `state`: what `verify` (or `latest_verified`) already returned, so the files are hashed once."""
    state = state if state is not None else verify(ckpt)
    try:
        optim_state = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
        tensors = torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(
            f"{ckpt}: incomplete or corrupted checkpoint ({str(e).splitlines()[0]})"
        ) from None
    set_model_state_dict(model, read_weights(ckpt), options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(model, optimizers, optim_state, options=StateDictOptions(full_state_dict=True))
    set_rng_state(tensors, state["rng"])
    return state


@contextlib.contextmanager
def run_lock(run_dir: Path, info: DistInfo):
    """The run directory's writer lock, held by rank 0 for the whole job; every rank learns at once
    whether it was taken, so none is left waiting in a collective for a rank that gave up. The holder
    then removes what a killed earlier writer left half-written."""
    lock = DirLock(run_dir, "train")
    error: Exception | None = None
    if info.is_main:
        try:
            lock.acquire()
        except Exception as e:  # noqa: BLE001 - whatever it is, the other ranks must hear of it
            error = e
    if all_reduce_sum([float(error is not None)], info.device)[0]:
        raise error or LockError(f"{run_dir}: rank 0 could not lock the run directory (its error says why)")
    try:
        if info.is_main:
            remove_leftovers(run_dir, "config.json")
            remove_leftovers(run_dir / "checkpoints")
        yield
    finally:
        lock.release()


def estimated_bytes(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> int:
    """A checkpoint's size before its optimizer state exists: the weights (the tied lm_head once)
    and per parameter AdamW's two moments or Muon's one momentum buffer."""
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    for opt in optimizers:
        buffers = 2 if "betas" in opt.defaults else 1
        size += sum(buffers * p.numel() * p.element_size() for g in opt.param_groups for p in g["params"])
    return size


def warn_about_space(
    run_dir: Path,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    keep_last: int,
    log: Callable[[str], None] = print,
) -> None:
    """Warn when the disk cannot hold keep_last checkpoints plus the one being written."""
    each = estimated_bytes(model, optimizers)
    free = free_bytes(run_dir)
    kept = sum(f.stat().st_size for d in all_steps(run_dir) for f in d.iterdir() if f.is_file())
    if free is None or free + kept >= (keep_last + 1) * each:
        return
    log(
        f"[gpt2repro] warning: {run_dir}: {human_bytes(free)} free"
        + (f" (and {human_bytes(kept)} in its checkpoints)" if kept else "")
        + f", but keep_last={keep_last} checkpoints and the one being written take about "
        f"{human_bytes((keep_last + 1) * each)} ({human_bytes(each)} each); training stops at a "
        "checkpoint that does not fit"
    )


def last_good(run_dir: Path) -> str:
    """Which checkpoint a resume would start from, for an error message."""
    try:
        found = latest(run_dir, log=lambda message: None)
    except CheckpointError:
        found = None
    return f"last good checkpoint: {found.name}" if found else "no checkpoint written yet"
