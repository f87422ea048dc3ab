"""Sharded checkpoints of FSDP runs on several ranks, through torch.distributed.checkpoint (DCP): every
rank writes the shard it holds, nothing gathers the full state, and a resume on any number of ranks
(one process without a process group included) reads only the slices its own shards need.

Layout of RUN_DIR/checkpoints/step_XXXXXXXX/:
  shard-0000R-model-00001-of-00001.safetensors  rank R-1's tensors: its chunk of every weight
                     (`model.NAME`, the tied lm_head once) and of the optimizer moments
                     (`optim.NAME.exp_avg`, …); the optimizer steps (replicated) on one rank only
  optimizer.json     the rest of the optimizer state: param_groups (hyperparameters, the names of
                     their parameters) and any non-tensor per-parameter value
  config.json, state.json, manifest.json   as in `gathered`; state.json holds the RNG states (torch's
                     as base64) and the sha256 of every other file
Why nothing is unpickled, read from torch 2.13's hf_storage.py, filesystem.py, default_planner.py:
`HuggingFaceStorageWriter(save_distributed=True)` writes each rank's tensors with safetensors, the
offset of each chunk in the full tensor in the header's JSON metadata, and (distributed, not
consolidated) no `.metadata` file at all; `HuggingFaceStorageReader` builds DCP's metadata from those
headers and reads slices through `safe_open`. DCP's planner unpickles (`torch.load`) only BYTE_IO
items, which these headers never declare: only tensors pass through DCP here; everything else is
JSON. (DCP's ranks exchange their plans with gather_object, as this module does the temporary
directory's name: objects the job's own processes made, never bytes from a file.) Resharding is
DCP's: each rank reads from the saved chunks the regions overlapping its current shard. What the
Hugging Face storage cannot do is done here: it carries no non-tensor values (the writer would put
a BYTE_IO item's bytes in front of the safetensors data), hence the JSON files; and its reader sizes
each tensor from the chunks it finds, so a missing chunk would leave part of a tensor as it was:
`_check_whole` refuses that before loading.

Publication as `gathered`'s: rank 0 makes a hidden temporary directory, every rank writes its shard
into it (the run directory must be on a file system all ranks share), DCP's closing collective
tells rank 0 all shards are on disk; rank 0 writes the JSON files, hashes every file into the
manifest and renames the directory into place, then moves `latest` and prunes. `ckptdir.verify`
checks every shard's sha256 and refuses a *.safetensors file the manifest does not list (the reader
would read it)."""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from ..config.schema import TrainConfig
from ..files.fsio import REASONS, AtomicDir, WriteError, describe, sha256_file, write_error
from ..model.gpt import GPT, WeightsMismatch, load_state_strict
from ..parallel.distributed import DistInfo, all_reduce_sum, stop_together
from .ckptdir import (
    MANIFEST,
    TIED,
    CheckpointError,
    publish,
    read_json,
    rng_state,
    set_rng_state,
    step_dir,
    write_manifest,
)


def save(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizers: list,
    state: dict,
    config: TrainConfig,
    info: DistInfo,
) -> Path:
    """Checkpoint `step` (every rank calls this, each writing its own shard); `latest` points at it
    and checkpoints beyond config.keep_last are removed. A failure on any rank stops every rank."""
    tensors, plain = split(get_model_state_dict(model), get_optimizer_state_dict(model, optimizers))
    final, what = step_dir(run_dir, step), f"checkpoint step {step}"
    needed = int(all_reduce_sum([_local_bytes(tensors, info.is_main)], info.device)[0])
    error: Exception | None = None
    try:
        with _staging(final, what, needed, info.is_main) as tmp:
            try:
                dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=True))
            except CheckpointException as e:  # a BaseException: every rank gets it
                raise _failure(e, final, what, writing=True) from None
            if info.is_main:
                # a rank whose directory is not rank 0's wrote its shard elsewhere: refuse before publishing
                hint = "; is the run directory on a file system every rank shares?"
                _check_whole(HuggingFaceStorageReader(str(tmp)), final, _sizes(tensors), hint)
                _write_rest(tmp, step, plain, state, config)
        if info.is_main:
            publish(final, config.keep_last)
    except Exception as e:  # noqa: BLE001 - every rank must still reach the next collective
        error = e
    stop_together(
        error,
        info.device,
        CheckpointError(f"{final}: another rank could not write the checkpoint (its error says why)"),
    )
    return final


def split(model_state: dict, optim_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a model and an optimizer state dict under flat names, and the rest of the
    optimizer state (JSON)."""
    tensors = {f"model.{k}": v for k, v in model_state.items() if k != TIED}
    rest: dict = {}
    for name, entry in optim_state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{name}.{key}"] = value
            else:
                rest.setdefault(name, {})[key] = value
    return tensors, {"state": rest, "param_groups": optim_state["param_groups"]}


def _local_bytes(tensors: dict[str, torch.Tensor], is_main: bool) -> int:
    """Bytes this rank writes: its chunks of the sharded tensors, and (rank 0) the replicated ones."""
    size = 0
    for t in tensors.values():
        local = t.to_local() if isinstance(t, DTensor) else t if is_main else None
        size += 0 if local is None else local.numel() * local.element_size()
    return size


@contextlib.contextmanager
def _staging(final: Path, what: str, needed: int, is_main: bool) -> Iterator[Path]:
    """Rank 0's hidden temporary directory beside `final` (`fsio.AtomicDir`: renamed into place when
    the block ends well, removed when it fails), its path told to every rank."""
    atomic, error = None, None
    if is_main:
        try:
            if not final.parent.parent.is_dir():  # the run directory deleted under a running job
                raise WriteError(describe(final, what, REASONS[errno.ENOENT]))
            # re-saving the same step (e.g. after a resume) replaces it whole
            atomic = AtomicDir(final, replace=True, what=what, needed=needed)
        except Exception as e:  # noqa: BLE001 - the other ranks must hear of it
            error = e
    shared = [str(atomic.tmp) if atomic else None]
    dist.broadcast_object_list(shared, src=0)
    if shared[0] is None:
        raise error or CheckpointError(
            f"{final}: rank 0 could not create the checkpoint (its error says why)"
        )
    if atomic is None:
        yield Path(shared[0])
        return
    with atomic as tmp:
        yield tmp


def _write_rest(tmp: Path, step: int, plain: dict, state: dict, config: TrainConfig) -> None:
    """Rank 0, once every shard is in `tmp`: the JSON files, then the manifest over everything."""
    (tmp / "optimizer.json").write_text(json.dumps(plain))
    (tmp / "config.json").write_text(config.to_json())
    sums = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
    tensors, rng = rng_state()
    rng["torch"] = _b64(tensors["torch"])
    if "cuda" in tensors:
        rng["cuda"] = [_b64(t) for t in tensors["cuda"]]
    content = {**state, "step": step, "rng": rng, "sha256": sums, "manifest": MANIFEST, "format": "dcp"}
    (tmp / "state.json").write_text(json.dumps(content))
    write_manifest(tmp, {**sums, "state.json": sha256_file(tmp / "state.json")})


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8)


def load_training(ckpt: Path, model: torch.nn.Module, optimizers: list, state: dict) -> None:
    """Restore model, optimizers and RNG in place from a verified sharded checkpoint (every rank, on
    any number of ranks: each reads the slices of its own shards)."""
    model_state, optim_state = get_model_state_dict(model), get_optimizer_state_dict(model, optimizers)
    tensors, _ = split(model_state, optim_state)
    _read(ckpt, tensors)
    plain = read_json(ckpt / "optimizer.json")
    set_model_state_dict(model, _model_state(tensors))
    set_optimizer_state_dict(model, optimizers, _join(tensors, plain, optim_state, ckpt))
    rng = state["rng"]
    try:
        tensors = {"torch": _unb64(rng["torch"])}
        if "cuda" in rng:
            tensors["cuda"] = [_unb64(s) for s in rng["cuda"]]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt / 'state.json'}: malformed RNG state ({e})") from None
    set_rng_state(tensors, rng)


def _join(tensors: dict[str, torch.Tensor], plain: dict, optim_state: dict, ckpt: Path) -> dict:
    """`optim_state` (this run's layout) with the loaded tensors and the saved rest."""
    groups, rest = plain.get("param_groups"), plain.get("state")
    if (
        not isinstance(groups, list)
        or len(groups) != len(optim_state["param_groups"])
        or not isinstance(rest, dict)
    ):
        raise CheckpointError(f"{ckpt / 'optimizer.json'}: its param_groups do not fit this run's optimizers")
    for name, entry in optim_state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                entry[key] = tensors[f"optim.{name}.{key}"]
        entry.update(rest.get(name, {}))
    optim_state["param_groups"] = [  # JSON made the tuples (betas) lists
        {k: tuple(v) if isinstance(mine.get(k), tuple) else v for k, v in saved.items()}
        for saved, mine in zip(groups, optim_state["param_groups"], strict=True)
    ]
    return optim_state


def _model_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    weights = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    weights[TIED] = weights["transformer.wte.weight"]
    return weights


def load_weights(ckpt: Path, model: GPT) -> None:
    """The weights of a sharded checkpoint into a whole (unsharded) model, in one process."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items() if k != TIED}
    _read(ckpt, tensors)
    try:
        load_state_strict(model, _model_state(tensors))
    except WeightsMismatch as e:
        raise CheckpointError(f"{ckpt}: weights do not fit the model ({e})") from None


def _read(ckpt: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Fill `tensors` in place from the shards of `ckpt` (a collective when a process group is up)."""
    with warnings.catch_warnings():  # one process: DCP warns that it loads without a process group
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            reader = HuggingFaceStorageReader(str(ckpt))
            _check_whole(reader, ckpt, _sizes(tensors))
            dcp.load(tensors, storage_reader=reader)
        except CheckpointException as e:
            raise _failure(e, ckpt, "loading the shards") from None
        except (OSError, SafetensorError, RuntimeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{ckpt}: cannot load the shards ({str(e).splitlines()[0]})") from None


def _sizes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Each tensor's whole shape (a DTensor's global one)."""
    return {name: tuple(t.shape) for name, t in tensors.items()}


def _check_whole(
    reader: HuggingFaceStorageReader, ckpt: Path, sizes: dict[str, tuple], hint: str = ""
) -> None:
    """Every tensor is in the shards whole, at the shape expected (their headers say which chunks
    they hold): DCP reads the chunks there are and would leave the rest of a tensor as it was."""
    found = reader.read_metadata().state_dict_metadata
    for name, size in sizes.items():
        saved = found.get(name)
        held = sum(math.prod(c.sizes) for c in getattr(saved, "chunks", ()))
        if saved is None or tuple(getattr(saved, "size", ())) != size or held != math.prod(size):
            raise CheckpointError(
                f"{ckpt}: the shards hold {held} values of {name}, not all {math.prod(size)} of it{hint}"
            )


def _failure(e: CheckpointException, path: Path, what: str, writing: bool = False) -> Exception:
    """One line for DCP's collected failures: a WriteError when the file system refused a write."""
    rank, (exc, _) = min(e.failures.items())
    refused = write_error(exc, path, what) if writing else None
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return refused or CheckpointError(f"{path}: {what} failed on rank {rank} ({detail})")
