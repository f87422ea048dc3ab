"""Training checkpoints: written atomically, the last K kept, a `latest` pointer updated last.

Layout of RUN_DIR/checkpoints/step_XXXXXXXX/ (single-process and DDP runs; an FSDP run on several
ranks writes its tensors as one shard file per rank instead, see `sharded`):
  model.safetensors  weights (our layout; the tied lm_head stored once)
  optimizer.pt       optimizer state, all optimizers of the run (tensors and numbers: weights_only=True)
  rng.pt             torch (and CUDA) RNG states
  config.json        the resolved TrainConfig
  state.json         step, python/numpy RNG, world size, and each component the loop passes under its
                     name (`loader`: its position; `clock`; `trainer`: the last metrics, …) (and the
                     sha256s of the files above, for older versions of this package)
  manifest.json      the size and sha256 of every file above, state.json included, and a sha256 of
                     its own content: verified on every load, with the step in state.json, the
                     directory's name and the loader position checked to agree (`ckptdir`)
A checkpoint is built in a hidden temporary directory and renamed into place (`fsio.AtomicDir`), so
a crash or a full disk mid-write never touches the previous one; `latest` moves only after the
rename. When `latest` is missing or broken, the newest checkpoint that verifies is used instead. A
checkpoint whose weights turned out to diverge is renamed `diverged_step_…` (kept, never resumed
from). Loading (`load_model`, `load_training`) reads either format.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from ..config.schema import TrainConfig
from ..files.fsio import REASONS, AtomicDir, WriteError, describe, sha256_file
from ..model.gpt import GPT, WeightsMismatch, load_state_strict
from .ckptdir import (
    FULL_FILES,
    MANIFEST,
    TIED,
    CheckpointError,
    is_sharded,
    latest,
    publish,
    rng_state,
    set_rng_state,
    stderr,
    step_dir,
    verify,
    write_manifest,
)


def gather(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state on CPU. Under FSDP every rank must call this."""
    # torch.distributed.checkpoint is imported where it is used: reading a checkpoint (eval, sample,
    # export, serve) never pays its second of import
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=full), get_optimizer_state_dict(
        model, optimizers, options=full
    )


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
        sums = {name: sha256_file(tmp / name) for name in FULL_FILES}
        content = {**state, "step": step, "rng": plain, "sha256": sums, "manifest": MANIFEST}
        (tmp / "state.json").write_text(json.dumps(content))
        write_manifest(tmp, {**sums, "state.json": sha256_file(tmp / "state.json")})
    publish(final, keep_last)
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


def resolve(path: str | os.PathLike) -> Path:
    """A verified checkpoint directory from a run directory, its checkpoints/ folder or the step
    directory itself."""
    path = Path(path)
    if (path / "model.safetensors").is_file() or is_sharded(path):
        verify(path)
        return path
    run_dir = path.parent if path.name == "checkpoints" else path
    found = latest(run_dir, log=stderr) if (run_dir / "checkpoints").is_dir() else None
    if found is not None:
        return found
    raise CheckpointError(
        f"{path}: not a checkpoint (no model.safetensors or shards) and no run with a latest checkpoint"
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
    if is_sharded(ckpt):
        from . import sharded

        sharded.load_weights(ckpt, model)
        return model.to(device)
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
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = state if state is not None else verify(ckpt)
    if is_sharded(ckpt):
        from . import sharded

        sharded.load_training(ckpt, model, optimizers, state)
        return state
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
