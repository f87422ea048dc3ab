"""Training checkpoints: written atomically, the last K kept, a `latest` pointer updated last.

Layout of RUN_DIR/checkpoints/step_XXXXXXXX/:
  model.safetensors  weights (our layout; the tied lm_head stored once)
  optimizer.pt       AdamW state (tensors and numbers only: loaded with weights_only=True)
  rng.pt             torch (and CUDA) RNG states
  state.json         step, loader position, python/numpy RNG, world size, last metrics
  config.json        the resolved TrainConfig
A checkpoint is built in a hidden temporary directory and renamed into place, so a crash or a full
disk mid-write never touches the previous one; `latest` moves only after the rename.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
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
from .fsio import atomic_write, atomic_write_text, fsync_dir
from .model import GPT

TIED = "lm_head.weight"
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted; the message names the file."""


def step_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def gather(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state on CPU. Under FSDP every rank must call this."""
    return get_model_state_dict(model, options=FULL), get_optimizer_state_dict(model, optimizer, options=FULL)


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
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        weights = {k: v.contiguous() for k, v in model_state.items() if k != TIED}
        atomic_write(
            tmp / "model.safetensors",
            lambda f: f.write(safetensors_bytes(weights, metadata={"format": "pt"})),
        )
        atomic_write(tmp / "optimizer.pt", lambda f: torch.save(optim_state, f))
        tensors, plain = rng_state()
        atomic_write(tmp / "rng.pt", lambda f: torch.save(tensors, f))
        atomic_write_text(tmp / "state.json", json.dumps({**state, "step": step, "rng": plain}))
        atomic_write_text(tmp / "config.json", config.to_json())
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / "latest", final.name + "\n")
    for old in sorted(root.glob("step_*"))[:-keep_last]:
        shutil.rmtree(old)
    return final


def latest(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `latest` points at, or None when the run has none yet."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} points at {path.name}, which does not exist")
    return path


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a run directory, its checkpoints/ folder or the step directory itself."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    run_dir = path.parent if path.name == "checkpoints" else path
    found = latest(run_dir) if (run_dir / "checkpoints").is_dir() else None
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
    from .hf import load_state_strict

    ckpt = resolve(path)
    model = GPT(read_config(ckpt).model)
    load_state_strict(model, read_weights(ckpt), source=str(ckpt))
    return model.to(device)


def load_training(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model, optimizer and RNG in place (all ranks); returns state.json's contents."""
    try:
        state = json.loads((ckpt / "state.json").read_text())
        optim_state = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
        tensors = torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(
            f"{ckpt}: incomplete or corrupted checkpoint ({str(e).splitlines()[0]})"
        ) from None
    set_model_state_dict(model, read_weights(ckpt), options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
    set_rng_state(tensors, state["rng"])
    return state
