"""HellaSwag in the two conventions people quote.

`completion` (the original build-nanogpt `hellaswag.py`): context = `ctx`, ending = " " + ending;
acc picks the lowest summed loss over the ending tokens, acc_norm the lowest mean loss per token.
`harness` (lm-evaluation-harness): query = preprocess(activity_label + ": " + ctx_a + " " +
ctx_b.capitalize()), continuation = " " + preprocess(ending), tokenized as a pair the harness way;
acc picks the highest summed log-likelihood, acc_norm the highest log-likelihood per character of
the preprocessed ending.

Scoring is batched: the four rows of many examples go through the model in one right-padded pass
(causal attention means padding on the right cannot change a scored position), and the lm_head is
applied only at the positions that predict ending tokens, instead of over the whole sequence.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import assets
from ..distributed import all_reduce_sum
from ..model import GPT
from ..tokenizer import get_tokenizer

STYLES = ("completion", "harness")
FIELDS = ("ctx", "ctx_a", "ctx_b", "activity_label", "endings", "label")


class HellaSwagError(ValueError):
    """Malformed HellaSwag input; the message names the file and line."""


@dataclass
class Rendered:
    """One example as token ids: a shared context, four endings, and the norm divisor per ending."""

    context: list[int]
    endings: list[list[int]]
    norms: list[float]
    label: int


def load_examples(path: str | os.PathLike | None = None, limit: int | None = None) -> list[dict]:
    """Validated rows of a HellaSwag jsonl (.gz accepted); the official validation file by default."""
    path = Path(path) if path is not None else assets.fetch("hellaswag_val.jsonl")
    if not path.is_file():
        raise HellaSwagError(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    examples = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit and len(examples) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise HellaSwagError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise HellaSwagError(f"{path}:{lineno}: expected a JSON object")
            missing = [k for k in FIELDS if k not in row]
            if missing:
                raise HellaSwagError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
            endings = row["endings"]
            if (
                not isinstance(endings, list)
                or len(endings) != 4
                or not all(isinstance(e, str) for e in endings)
            ):
                raise HellaSwagError(f"{path}:{lineno}: 'endings' must be a list of 4 strings")
            if (
                not isinstance(row["label"], int)
                or isinstance(row["label"], bool)
                or not 0 <= row["label"] <= 3
            ):
                raise HellaSwagError(f"{path}:{lineno}: 'label' must be an integer 0-3, got {row['label']!r}")
            examples.append(row)
    return examples


def preprocess(text: str) -> str:
    """lm-evaluation-harness's HellaSwag text clean-up."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def harness_pair(enc, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's `_encode_pair`: trailing spaces move to the continuation, which is the tail of
    the joint encoding after the context's tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = enc.encode_ordinary(context + continuation)
    ctx = enc.encode_ordinary(context)
    return ctx, whole[len(ctx) :]


def render(example: dict, style: str, enc=None) -> Rendered:
    enc = enc or get_tokenizer()
    if style == "completion":
        context = enc.encode_ordinary(example["ctx"])
        endings = [enc.encode_ordinary(" " + e) for e in example["endings"]]
        norms = [float(len(e)) for e in endings]
    elif style == "harness":
        query = preprocess(
            example["activity_label"] + ": " + example["ctx_a"] + " " + example["ctx_b"].capitalize()
        )
        choices = [preprocess(e) for e in example["endings"]]
        pairs = [harness_pair(enc, query, " " + c) for c in choices]
        context = pairs[0][0]
        if any(p[0] != context for p in pairs):
            raise HellaSwagError("harness contexts differ between endings")  # cannot happen for GPT-2's BPE
        endings = [p[1] for p in pairs]
        norms = [float(len(c)) for c in choices]
    else:
        raise ValueError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")
    return Rendered(context, endings, norms, int(example["label"]))


def row_tokens(r: Rendered, ending: int, block_size: int) -> tuple[list[int], int]:
    """Context + ending, left-truncated to block_size; returns (tokens, index of first ending token)."""
    tokens = r.context + r.endings[ending]
    cut = max(0, len(tokens) - block_size)
    return tokens[cut:], len(r.context) - cut


def predictions(logprob_sums: list[float], norms: list[float], style: str) -> tuple[int, int]:
    """(acc prediction, acc_norm prediction) from each ending's summed log-probability."""
    normed = [s / n for s, n in zip(logprob_sums, norms)]
    best = max(range(4), key=lambda i: (logprob_sums[i], -i))
    best_norm = max(range(4), key=lambda i: (normed[i], -i))
    return best, best_norm


@torch.no_grad()
def score(
    model: GPT,
    rendered: list[Rendered],
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    dtype: str = "fp32",
    min_batches: int = 0,
) -> list[list[float]]:
    """Summed log-probability of each ending, per example: a list of 4 floats each.

    `min_batches` pads with throw-away forward passes so that every rank of a sharded (FSDP) model
    runs the same number of forwards, since each one is a collective."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    block = model.config.block_size
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    order = sorted(
        range(len(rendered)),
        key=lambda i: -max(len(r) for r in [rendered[i].context + e for e in rendered[i].endings]),
    )
    out: list[list[float]] = [[0.0] * 4 for _ in rendered]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        rows = [row_tokens(rendered[i], j, block) for i in chunk for j in range(4)]
        width = max(len(t) for t, _ in rows)
        idx = torch.zeros(len(rows), width, dtype=torch.long)
        row_ids, positions, targets = [], [], []
        for r, (tokens, first) in enumerate(rows):
            idx[r, : len(tokens)] = torch.tensor(tokens)
            for p in range(first, len(tokens)):  # position p-1 predicts token p
                row_ids.append(r)
                positions.append(p - 1)
                targets.append(tokens[p])
        with autocast:
            h = model.hidden(idx.to(device))
            logits = model.logits(
                h[torch.tensor(row_ids, device=device), torch.tensor(positions, device=device)]
            )
        logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).gather(
            1, torch.tensor(targets, device=device)[:, None]
        )[:, 0]
        sums = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(
            0, torch.tensor(row_ids, device=device), logp.double()
        )
        for k, i in enumerate(chunk):
            out[i] = sums[4 * k : 4 * k + 4].tolist()
    for _ in range(math.ceil(len(order) / batch_size), min_batches):
        model.hidden(torch.zeros(1, 1, dtype=torch.long, device=device))
    model.train(was_training)
    return out


def evaluate(
    model: GPT,
    examples: list[dict],
    style: str = "completion",
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 16,
    dtype: str = "fp32",
    details: list | None = None,
    lockstep: bool = False,
) -> dict:
    """{n, acc, acc_norm} over `examples`, sharded across ranks (example i goes to rank i % world) and
    summed over all of them; identical to a single-process run. Appends per-example records to
    `details` when given (this rank's share). `lockstep` (for FSDP) makes every rank run the same
    number of forward passes."""
    enc = get_tokenizer()
    mine = list(range(rank, len(examples), world_size))
    rendered = [render(examples[i], style, enc) for i in mine]
    most = math.ceil(math.ceil(len(examples) / world_size) / batch_size) if lockstep else 0
    sums = score(model, rendered, device, batch_size, dtype, min_batches=most)
    correct = correct_norm = 0
    for i, r, s in zip(mine, rendered, sums):
        pred, pred_norm = predictions(s, r.norms, style)
        correct += pred == r.label
        correct_norm += pred_norm == r.label
        if details is not None:
            details.append(
                {
                    "index": i,
                    "label": r.label,
                    "pred": pred,
                    "pred_norm": pred_norm,
                    "logprob_sums": s,
                    "norm_scores": [x / n for x, n in zip(s, r.norms)],
                }
            )
    counts = all_reduce_sum([len(mine), correct, correct_norm], device)
    n, correct, correct_norm = (int(c) for c in counts)
    return {"style": style, "n": n, "acc": correct / max(n, 1), "acc_norm": correct_norm / max(n, 1)}
