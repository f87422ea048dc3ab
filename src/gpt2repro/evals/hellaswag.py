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

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import UserError
from ..files import assets, jsonio
from ..model import precision
from ..model.gpt import GPT
from ..parallel.distributed import all_reduce_sum
from ..text.tokenizer import get_tokenizer

STYLES = ("completion", "harness")
FIELDS = ("ctx", "ctx_a", "ctx_b", "activity_label", "endings", "label")
TEXT_FIELDS = ("ctx", "ctx_a", "ctx_b", "activity_label")


class HellaSwagError(UserError, ValueError):
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
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise HellaSwagError(f"limit must be a positive number of examples (or none for all), got {limit!r}")
    path = Path(path) if path is not None else assets.fetch("hellaswag_val.jsonl")
    if not path.is_file():
        raise HellaSwagError(f"{path}: no such file")
    examples: list[dict] = []
    lineno = 0
    try:
        with jsonio.open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if limit and len(examples) >= limit:
                    break
                if line.strip():
                    examples.append(_example(line, f"{path}:{lineno}"))
    except EOFError:  # a gzip stream cut short
        raise HellaSwagError(
            f"{path}:{lineno + 1}: the gzip stream ends early (a truncated download?)"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise HellaSwagError(f"{path}: cannot read it as its extension says ({type(e).__name__})") from None
    if not examples:
        raise HellaSwagError(f"{path}: no examples")
    return examples


def _example(line: str, where: str) -> dict:
    """One validated row, or a one-line error naming `where` (file:line) and the field."""
    try:
        row = jsonio.loads(line)
    except jsonio.NotJSON as e:
        raise HellaSwagError(f"{where}: {e}") from None
    if not isinstance(row, dict):
        raise HellaSwagError(f"{where}: expected a JSON object")
    missing = [k for k in FIELDS if k not in row]
    if missing:
        raise HellaSwagError(f"{where}: missing field(s) {', '.join(missing)}")
    endings = row["endings"]
    if (
        not isinstance(endings, list)
        or len(endings) != 4
        or not all(isinstance(e, str) and e.strip() for e in endings)
    ):
        raise HellaSwagError(f"{where}: 'endings' must be a list of 4 non-empty strings")
    label = row["label"]
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label <= 3:
        raise HellaSwagError(f"{where}: 'label' must be an integer 0-3, got {jsonio.shown(row['label'])}")
    wrong = next((k for k in TEXT_FIELDS if not isinstance(row[k], str)), None)
    if wrong:
        raise HellaSwagError(f"{where}: {wrong!r} must be text, got {type(row[wrong]).__name__}")
    bad = next(filter(None, (jsonio.lone_surrogate(row[k], k) for k in (*TEXT_FIELDS, "endings"))), None)
    if bad:
        raise HellaSwagError(
            f"{where}: field {bad} is not valid Unicode text (a lone surrogate, such as \\ud800)"
        )
    return row


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


def predictions(logprob_sums: list[float], norms: list[float]) -> tuple[int, int]:
    """(acc prediction, acc_norm prediction) from each ending's summed log-probability."""
    normed = [s / n for s, n in zip(logprob_sums, norms)]
    best = max(range(4), key=lambda i: (logprob_sums[i], -i))
    best_norm = max(range(4), key=lambda i: (normed[i], -i))
    return best, best_norm


@dataclass
class _Unit:
    """One context followed by its endings, scored as a tree: each ending sees the context and itself."""

    example: int
    tokens: list[int]
    positions: list[int]
    segments: list[int]  # 0 = context, k + 1 = ending k
    scored: list[tuple[int, int, int]]  # (index of the predicting token, target token, ending k)


def _units(example: int, r: Rendered, block: int) -> list[_Unit]:
    """Normally one unit holding the context once and all four endings. If context + ending would
    exceed block_size, four units, each left-truncated like `row_tokens` (no shared context)."""
    if len(r.context) + max(len(e) for e in r.endings) <= block:
        parts = [(r.context, list(enumerate(r.endings)))]
    else:
        parts = []
        for k in range(4):
            tokens, first = row_tokens(r, k, block)
            if first < 1:
                raise HellaSwagError(f"example {example}: ending {k} alone does not fit block_size={block}")
            parts.append((tokens[:first], [(k, tokens[first:])]))
    units = []
    for context, endings in parts:
        u = _Unit(example, list(context), list(range(len(context))), [0] * len(context), [])
        for k, end in endings:
            start = len(u.tokens)
            for m, tok in enumerate(end):
                u.scored.append((len(context) - 1 if m == 0 else start + m - 1, tok, k))
            u.tokens += end
            u.positions += range(len(context), len(context) + len(end))
            u.segments += [k + 1] * len(end)
        units.append(u)
    return units


def _pack(units: list[_Unit], length: int) -> list[list[_Unit]]:
    """Greedy first-fit of units into rows of `length` tokens (a longer unit gets a row of its own)."""
    rows: list[list[_Unit]] = []
    used: list[int] = []
    for u in sorted(units, key=lambda u: -len(u.tokens)):
        for i, n in enumerate(used):
            if n + len(u.tokens) <= length:
                rows[i].append(u)
                used[i] += len(u.tokens)
                break
        else:
            rows.append([u])
            used.append(len(u.tokens))
    return rows


LM_HEAD_ROWS = 512  # scored positions per lm_head chunk: bounded memory for any batch or model size


def _target_logprobs(model: GPT, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each row of h: the lm_head over the vocabulary, a few hundred rows at a time."""
    logits = model.logits(h)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


class _Batch(NamedTuple):
    idx: torch.Tensor  # (rows, width) token ids
    pos: torch.Tensor  # (rows, width) positions, restarting after each context
    mask: torch.Tensor  # (rows, 1, width, width) which tokens each token may attend to
    pred_row: list[int]  # where each scored token is predicted, and its target
    pred_col: list[int]
    targets: list[int]
    owner: list[int]  # 4 * (example - first example of the batch) + ending


def _batch(rendered: list[Rendered], start: int, stop: int, block: int, pack_len: int) -> _Batch:
    units = [u for i in range(start, stop) for u in _units(i, rendered[i], block)]
    rows = _pack(units, max(pack_len, max(len(u.tokens) for u in units)))
    width = max(sum(len(u.tokens) for u in row) for row in rows)
    idx = torch.zeros(len(rows), width, dtype=torch.long)
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    unit_id = -1 - torch.arange(width).repeat(len(rows), 1)  # padding: a unit of its own per token
    seg = torch.zeros(len(rows), width, dtype=torch.long)
    pred_row, pred_col, targets, owner = [], [], [], []
    for r, row in enumerate(rows):
        offset = 0
        for n, u in enumerate(row):
            span = slice(offset, offset + len(u.tokens))
            idx[r, span] = torch.tensor(u.tokens)
            pos[r, span] = torch.tensor(u.positions)
            seg[r, span] = torch.tensor(u.segments)
            unit_id[r, span] = n
            for at, tok, k in u.scored:
                pred_row.append(r)
                pred_col.append(offset + at)
                targets.append(tok)
                owner.append(4 * (u.example - start) + k)
            offset += len(u.tokens)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    visible = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
    mask = (unit_id[:, :, None] == unit_id[:, None, :]) & causal & visible
    return _Batch(idx, pos, mask[:, None], pred_row, pred_col, targets, owner)


@torch.no_grad()
def score(
    model: GPT,
    rendered: list[Rendered],
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    dtype: str = "fp32",
    min_batches: int = 0,
    pack_len: int = 192,
) -> list[list[float]]:
    """Summed log-probability of each ending, per example: a list of 4 floats each.

    Each forward pass takes `batch_size` examples, each as one unit (context once, then the four
    endings, with a mask so every ending sees only the context and itself, positions restarting
    after the context), packed into rows of `pack_len` tokens: about half the tokens of four padded
    rows per example, and no padding. Short rows (192 tokens: two or three units) keep the attention
    spent on masked-out pairs small; `gpt2repro bench hellaswag` measured 192 and 32 examples best.
    `min_batches` adds throw-away forward passes so that every rank of a sharded (FSDP) model runs
    the same number of them, since each one is a collective."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    autocast = precision.autocast(device, dtype)
    out: list[list[float]] = [[0.0] * 4 for _ in rendered]
    batches = 0
    with autocast:  # one context for the whole run, so autocast casts each weight to bf16 only once
        for start in range(0, len(rendered), batch_size):
            stop = min(start + batch_size, len(rendered))
            b = _batch(rendered, start, stop, model.config.block_size, pack_len)
            h = model.hidden(b.idx.to(device), positions=b.pos.to(device), mask=b.mask.to(device))
            h = h[torch.tensor(b.pred_row, device=device), torch.tensor(b.pred_col, device=device)]
            tgt = torch.tensor(b.targets, device=device)
            logp = torch.cat(
                [
                    _target_logprobs(model, h[s : s + LM_HEAD_ROWS], tgt[s : s + LM_HEAD_ROWS])
                    for s in range(0, len(tgt), LM_HEAD_ROWS)
                ]
            )
            sums = torch.zeros(4 * (stop - start), dtype=torch.float64, device=device)
            sums.index_add_(0, torch.tensor(b.owner, device=device), logp.double())
            for e in range(stop - start):
                out[start + e] = sums[4 * e : 4 * e + 4].tolist()
            batches += 1
        for _ in range(batches, min_batches):
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
    batch_size: int = 32,
    dtype: str = "fp32",
    details: list | None = None,
    lockstep: bool = False,
    rendered: list[Rendered] | None = None,
) -> dict:
    """{n, acc, acc_norm} over `examples`, sharded across ranks (example i goes to rank i % world) and
    summed over all of them; identical to a single-process run. Appends per-example records to
    `details` when given (this rank's share). `lockstep` (for FSDP) makes every rank run the same
    number of forward passes. `rendered`: all examples already rendered in `style`, so evaluating
    during training tokenizes them once per run rather than at every evaluation."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise HellaSwagError(f"batch size must be a positive number of examples, got {batch_size!r}")
    if not examples:
        raise HellaSwagError("no examples to evaluate")
    enc = get_tokenizer()
    mine = list(range(rank, len(examples), world_size))
    if rendered is not None and len(rendered) != len(examples):
        raise ValueError(f"{len(rendered)} rendered examples for {len(examples)} examples")
    rendered = [render(examples[i], style, enc) if rendered is None else rendered[i] for i in mine]
    most = math.ceil(math.ceil(len(examples) / world_size) / batch_size) if lockstep else 0
    sums = score(model, rendered, device, batch_size, dtype, min_batches=most)
    correct = correct_norm = 0
    for i, r, s in zip(mine, rendered, sums):
        pred, pred_norm = predictions(s, r.norms)
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
