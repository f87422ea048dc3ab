"""Scoring many token rows that share prefixes in a few forward passes.

A `Tree` is the rows of one question: their shared prefix once, then each row's rest as a branch.
A branch's tokens attend to the prefix and to themselves only, at the positions they would have in
their own row, so each scored position sees exactly what it would see in the row alone (causal
attention: nothing after it, nothing of another branch). Trees are packed first-fit into rows of
`pack_len` tokens, each token attending within its own tree; padding attends to itself alone. The
lm_head runs only at the positions that predict a scored token, a few hundred at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..model.gpt import GPT

LM_HEAD_ROWS = 512  # scored positions per lm_head chunk: bounded memory for any batch or model size


@dataclass
class Tree:
    """Rows `prefix + branches[k]`, each scored on its targets [start, end) (indices into the row)."""

    prefix: list[int]
    branches: list[list[int]]
    spans: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.prefix) + sum(len(b) for b in self.branches)


class _Layout(NamedTuple):
    tokens: list[int]
    positions: list[int]
    segments: list[int]  # 0: the prefix; k + 1: branch k
    scored: list[tuple[int, int, int]]  # (index of the predicting token, target, branch)


def _layout(t: Tree) -> _Layout:
    shared = len(t.prefix)
    tokens, positions, segments = list(t.prefix), list(range(shared)), [0] * shared
    scored = []
    for k, (branch, (start, end)) in enumerate(zip(t.branches, t.spans)):
        offset = len(tokens)
        row = t.prefix + branch
        for j in range(start, end):
            at = j - 1 if j - 1 < shared else offset + j - 1 - shared
            scored.append((at, row[j], k))
        tokens += branch
        positions += range(shared, shared + len(branch))
        segments += [k + 1] * len(branch)
    return _Layout(tokens, positions, segments, scored)


def pack(sizes: list[int], length: int) -> list[list[int]]:
    """Indices of items of these sizes, first-fit (largest first) into rows of `length`; an item
    longer than that gets a row of its own."""
    rows: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        for r, n in enumerate(used):
            if n + sizes[i] <= length:
                rows[r].append(i)
                used[r] += sizes[i]
                break
        else:
            rows.append([i])
            used.append(sizes[i])
    return rows


class _Batch(NamedTuple):
    idx: torch.Tensor
    pos: torch.Tensor
    mask: torch.Tensor  # (rows, 1, width, width): who may attend to whom
    pred_row: torch.Tensor
    pred_col: torch.Tensor
    targets: torch.Tensor
    owner: torch.Tensor  # the (tree, branch) each scored token belongs to, numbered across the batch


def _batch(layouts: list[_Layout], first_owner: list[int], pack_len: int) -> _Batch:
    sizes = [len(lay.tokens) for lay in layouts]
    rows = pack(sizes, max(pack_len, max(sizes)))
    width = max(sum(sizes[i] for i in row) for row in rows)
    idx = torch.zeros(len(rows), width, dtype=torch.long)
    pos = torch.zeros_like(idx)
    seg = torch.zeros_like(idx)
    unit = -1 - torch.arange(width).repeat(len(rows), 1)  # padding: a unit of its own per token
    pred_row, pred_col, targets, owner = [], [], [], []
    for r, row in enumerate(rows):
        offset = 0
        for n, i in enumerate(row):
            lay, span = layouts[i], slice(offset, offset + sizes[i])
            idx[r, span], pos[r, span] = torch.tensor(lay.tokens), torch.tensor(lay.positions)
            seg[r, span], unit[r, span] = torch.tensor(lay.segments), n
            for at, target, k in lay.scored:
                pred_row.append(r)
                pred_col.append(offset + at)
                targets.append(target)
                owner.append(first_owner[i] + k)
            offset += sizes[i]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    visible = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
    mask = (unit[:, :, None] == unit[:, None, :]) & causal & visible
    as_long = (torch.tensor(v, dtype=torch.long) for v in (pred_row, pred_col, targets, owner))
    return _Batch(idx, pos, mask[:, None], *as_long)


def _scored(model: GPT, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) at each row of h, and whether the target is the most likely token there."""
    logits = model.logits(h)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logp = logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
    return logp, logits.argmax(dim=-1) == targets


def score_batch(model: GPT, trees: list[Tree], device: torch.device, pack_len: int):
    """One forward pass over `trees`; per tree, per branch: (summed log-probability of its scored
    tokens, their count, whether greedy decoding gives every one)."""
    first, n = [], 0
    for t in trees:
        first.append(n)
        n += len(t.branches)
    b = _batch([_layout(t) for t in trees], first, pack_len)
    h = model.hidden(b.idx.to(device), positions=b.pos.to(device), mask=b.mask.to(device))
    h = h[b.pred_row.to(device), b.pred_col.to(device)]
    targets, owner = b.targets.to(device), b.owner.to(device)
    sums = torch.zeros(n, dtype=torch.float64, device=device)
    counts = torch.zeros(n, dtype=torch.long, device=device)
    misses = torch.zeros(n, dtype=torch.long, device=device)
    for s in range(0, len(targets), LM_HEAD_ROWS):
        logp, hit = _scored(model, h[s : s + LM_HEAD_ROWS], targets[s : s + LM_HEAD_ROWS])
        sums.index_add_(0, owner[s : s + LM_HEAD_ROWS], logp.double())
        counts.index_add_(0, owner[s : s + LM_HEAD_ROWS], torch.ones_like(hit, dtype=torch.long))
        misses.index_add_(0, owner[s : s + LM_HEAD_ROWS], (~hit).long())
    sums, counts, misses = sums.tolist(), counts.tolist(), misses.tolist()
    return [
        (
            sums[a : a + len(t.branches)],
            counts[a : a + len(t.branches)],
            [m == 0 for m in misses[a : a + len(t.branches)]],
        )
        for a, t in zip(first, trees)
    ]


def score_trees(
    model: GPT,
    trees: list[Tree],
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    pack_len: int = 1024,
    min_batches: int = 0,
) -> list[tuple[list[float], list[int], list[bool]]]:
    """score_batch over `batch_size` trees at a time. `min_batches` adds throw-away forward passes,
    so that every rank of a sharded (FSDP) model runs as many (each one is a collective)."""
    device = torch.device(device)
    out = []
    for start in range(0, len(trees), batch_size):
        out += score_batch(model, trees[start : start + batch_size], device, pack_len)
    for _ in range(-(-len(trees) // batch_size), min_batches):
        model.hidden(torch.zeros(1, 1, dtype=torch.long, device=device))
    return out
