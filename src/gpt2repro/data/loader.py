"""Distributed, shuffling, exactly resumable batches from token shards.

The data is cut into windows of B*T tokens (plus one for the shifted targets) inside each shard.
An epoch is an ordered list of (shard, window) pairs: sequential for `shuffle=False` (the original's
order, and always for validation), otherwise one permutation of all windows of all shards drawn from
(seed, epoch), so every epoch is shuffled differently and reproducibly, and shards that differ (one
source after another) do not turn into phases of training. Rank r of W takes items r, r+W, r+2W, ...:
ranks are disjoint and together cover the epoch. An optimizer step consumes `step_windows` windows
(grad_accum x W, fixed by the global batch), and the epoch is cut to a multiple of it, so the
windows of each step are the same on any number of ranks. The state is (epoch, windows consumed in
it), world-size free: a run resumes on any number of ranks that divides its global batch.
With `masks` (conversation data, `prepare --chat`), targets that are not learned read -1, which the
loss ignores.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .shards import ShardError, find_shards, mask_path, read_mask, read_shard


class DataLoader:
    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 1337,
        device: str | torch.device = "cpu",
        vocab_size: int | None = None,
        step_windows: int | None = None,
        masks: bool = False,
    ):
        step_windows = step_windows or world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not within world_size {world_size}")
        if step_windows % world_size:
            raise ValueError(f"{step_windows} windows per step do not split over {world_size} ranks")
        self.B, self.T, self.rank, self.world = batch_size, seq_len, rank, world_size
        self.step_windows, self.vocab_size = step_windows, vocab_size
        self.shuffle, self.seed, self.split = shuffle, seed, split
        self.device = torch.device(device)
        self.paths = find_shards(data_dir, split)
        self.shards = [read_shard(p) for p in self.paths]
        self.masks = [read_mask(p, len(s)) for p, s in zip(self.paths, self.shards)] if masks else None
        if not masks and mask_path(self.paths[0]).is_file():
            raise ShardError(
                f"{data_dir} holds conversations with loss masks: fine-tune a chat model on them "
                "(the sft preset, or model.chat=true)"
            )
        window = batch_size * seq_len
        self.windows = [(len(s) - 1) // window for s in self.shards]
        if max(self.windows) == 0:
            longest = max(len(s) for s in self.shards)
            raise ShardError(
                f"{data_dir}: no {split!r} shard holds B*T+1 = {window + 1} tokens (largest has {longest}); "
                "lower micro_batch_size or seq_len"
            )
        if sum(self.windows) < step_windows:
            raise ShardError(
                f"{data_dir}: {split!r} has {sum(self.windows)} batches of B*T tokens, fewer than the "
                f"{step_windows} one step takes"
            )
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    @property
    def steps_per_epoch(self) -> int:
        """Micro-batches per epoch on each rank."""
        return sum(self.windows) // self.step_windows * self.step_windows // self.world

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """(shard, window) pairs of this rank for an epoch, shape (steps_per_epoch, 2)."""
        pairs = np.array(
            [(s, w) for s in range(len(self.shards)) for w in range(self.windows[s])], dtype=np.int64
        ).reshape(-1, 2)
        if self.shuffle:  # one permutation over all windows: every batch mixes the whole corpus
            pairs = pairs[np.random.default_rng([self.seed, epoch]).permutation(len(pairs))]
        return pairs[self.rank : self.steps_per_epoch * self.world : self.world]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position >= len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        shard, window = self._order[self.position]
        self.position += 1
        start = int(window) * self.B * self.T
        buf = torch.from_numpy(self.shards[shard][start : start + self.B * self.T + 1].astype(np.int64))
        if (
            self.vocab_size is not None and int(buf.max()) >= self.vocab_size
        ):  # checked as read: no pass over every shard
            raise ShardError(
                f"{self.paths[shard]}: token id {int(buf.max())} >= vocab_size {self.vocab_size} "
                f"(tokens {start}..{start + self.B * self.T})"
            )
        x, y = buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)
        if self.masks is not None:  # targets not learned: -1, ignored by the loss
            learned = torch.from_numpy(
                self.masks[shard][start + 1 : start + self.B * self.T + 1].astype(bool)
            )
            y = y.masked_fill(~learned.view(self.B, self.T), -1)
        if self.device.type == "cuda":  # pinned host memory lets the copy overlap compute
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(
                self.device, non_blocking=True
            )
        return x.to(self.device), y.to(self.device)

    def reset(self) -> None:
        """Back to the start of epoch 0 (validation reads the same batches every time)."""
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "consumed": self.position * self.world,  # windows of this epoch taken by all ranks
            "step_windows": self.step_windows,
            "epoch_windows": self.steps_per_epoch * self.world,  # so a checkpoint can check its step
            "seed": self.seed,
            "shuffle": self.shuffle,
            "batch_size": self.B,
            "seq_len": self.T,
            "shards": [Path(p).name for p in self.paths],
        }

    def load_state_dict(self, state: dict) -> None:
        if "consumed" not in state:  # written before resuming on other world sizes: same world size only
            state = {
                **state,
                "consumed": state["position"] * state["world_size"],
                "step_windows": self.step_windows,
            }
            if state.pop("world_size") != self.world:
                raise ValueError("loader state of an older version: resume with the same number of ranks")
        mine = self.state_dict()
        for key in ("step_windows", "seed", "shuffle", "batch_size", "seq_len", "shards"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"loader state has {key}={state[key]!r} but this loader has {mine[key]!r}; cannot resume exactly"
                )
        if state["consumed"] % self.world:
            raise ValueError(
                f"{state['consumed']} windows consumed is not a step boundary for {self.world} ranks"
            )
        self.epoch, self.position = state["epoch"], state["consumed"] // self.world
        self._order = self._epoch_order(self.epoch)
