"""Keys and values kept between forward passes, for decoding: one slot per sequence, each at its
own length.

Several sequences of different lengths share one cache (a server's batch), a slot is reused by
resetting it, and a sequence continues where it stopped (a chat's next turn encodes only its new
tokens). Each forward pass calls `begin(T)` once (the new tokens' positions, and how attention must
mask), then every layer `insert`s its keys and values, then `advance` moves the lengths on."""

from __future__ import annotations

import torch

from ..config.schema import GPTConfig


class KVCache:
    def __init__(self, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor):
        self.k, self.v = k, v  # (n_layer, slots, n_head, block_size, head_dim)
        self.lengths = lengths  # (slots,) int64 on the CPU: tokens cached per slot
        self._T, self._end, self._start = 0, 0, None
        self._index: tuple[torch.Tensor, torch.Tensor] | None = None
        self._mask: torch.Tensor | None = None

    @classmethod
    def empty(cls, config: GPTConfig, slots: int, device, dtype: torch.dtype) -> KVCache:
        shape = (config.n_layer, slots, config.n_head, config.block_size, config.n_embd // config.n_head)
        k, v = (torch.zeros(shape, device=device, dtype=dtype) for _ in range(2))
        return cls(k, v, torch.zeros(slots, dtype=torch.long))

    @property
    def slots(self) -> int:
        return self.k.size(1)

    def slot(self, i: int) -> KVCache:
        """Slot i alone, sharing memory and length with this cache (e.g. to prefill one request
        while the others wait)."""
        return KVCache(self.k[:, i : i + 1], self.v[:, i : i + 1], self.lengths[i : i + 1])

    def reset(self, i: int | None = None) -> None:
        """Forget slot i (every slot when None): its memory is reused by the next sequence."""
        self.lengths[slice(None) if i is None else i] = 0

    def begin(self, T: int, device: torch.device) -> torch.Tensor:
        """Prepare a forward pass of T new tokens per slot; their absolute positions, (T,) when every
        slot is at the same length, else (slots, T)."""
        lengths = self.lengths.tolist()
        self._T, self._end = T, max(lengths) + T
        if self._end > self.k.size(3):
            raise ValueError(
                f"sequence of {self._end} tokens exceeds block_size={self.k.size(3)}; crop the input"
            )
        if len(set(lengths)) == 1:  # aligned: slices, and a mask only for a chunk after the start
            start = self._start = lengths[0]
            self._index = None
            self._mask = (
                None
                if T == 1 or start == 0
                else torch.ones(T, start + T, dtype=torch.bool, device=device).tril(start)
            )
            return torch.arange(start, start + T, device=device)
        self._start = None
        positions = self.lengths.to(device)[:, None] + torch.arange(T, device=device)  # (slots, T)
        self._index = (torch.arange(self.slots, device=device)[:, None].expand(-1, T), positions)
        keys = torch.arange(self._end, device=device)
        self._mask = (keys[None, None, :] <= positions[:, :, None])[:, None]  # (slots, 1, T, end)
        return positions

    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store one layer's new keys/values (slots, n_head, T, head_dim); return that layer's keys and
        values so far, the attention mask (None: no mask) and whether attention is plainly causal."""
        if self._index is None:
            self.k[layer, :, :, self._start : self._start + self._T] = k
            self.v[layer, :, :, self._start : self._start + self._T] = v
        else:
            rows, cols = self._index
            self.k[layer][rows, :, cols] = k.transpose(1, 2)
            self.v[layer][rows, :, cols] = v.transpose(1, 2)
        causal = self._index is None and self._start == 0 and self._T > 1
        return self.k[layer, :, :, : self._end], self.v[layer, :, :, : self._end], self._mask, causal

    def advance(self) -> None:
        self.lengths += self._T

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one new token's keys and values for every layer and slot, (n_layer, slots, n_head,
        1, head_dim), each after its slot's cached ones, and move the lengths on (a decoding step
        that only read the cache and checked its room: `generation/decoding.py`)."""
        lengths = self.lengths.tolist()
        if len(set(lengths)) == 1:
            self.k[:, :, :, lengths[0] : lengths[0] + 1] = k
            self.v[:, :, :, lengths[0] : lengths[0] + 1] = v
        else:  # (slots, n_layer, n_head, head_dim) at each slot's own position
            slots, at = torch.arange(self.slots, device=k.device), self.lengths.to(k.device)
            self.k[:, slots, :, at] = k[:, :, :, 0].transpose(0, 1)
            self.v[:, slots, :, at] = v[:, :, :, 0].transpose(0, 1)
        self.lengths += 1
