"""The CORE metric (DCLM, arXiv 2406.11794), scored as nanochat's core_eval.py scores it.

Each item's prompt: `num_fewshot` other items of its task, drawn with `random.Random(1234 + index)`,
each followed by a blank line, then the item. Multiple choice: one prompt per choice, `query +
delimiter + choice` (few-shot items show their gold choice); schema: one per context option,
`option + delimiter + continuation`; language modeling: `context.strip() + delimiter +
continuation`. Each is tokenized with the model's BOS (`<|endoftext|>`) in front and, past the
context, truncated on the left. The scored tokens: multiple choice, those after the prompts' common
token prefix; schema, the common token suffix; language modeling, those after the prompt without
its continuation. Multiple choice and schema pick the prompt with the lowest mean loss over them
(the first on a tie); language modeling is correct when greedy decoding gives every one of them.
Accuracy is centered on the task's random baseline, and CORE is the mean of the centered accuracies.

Speed: every prompt of an item is one tree (the shared token prefix once, each prompt's rest as a
branch that sees the prefix and itself), and the trees of many items are packed into a few rows of
one forward pass, the lm_head applied only where a scored token is predicted (`evals.packing`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from ..config.schema import TrainConfig
from ..model import precision
from ..model.gpt import GPT
from ..parallel.distributed import DistInfo, all_reduce_sum, stop_together
from ..text.tokenizer import get_tokenizer
from .core_data import GPT2_CORE, CoreError, Task, load_bundle
from .packing import Tree, score_trees

FEWSHOT_SEED = 1234


@dataclass
class Prepared:
    """One item as token rows (BOS first, left-truncated) and each row's scored span [start, end)."""

    rows: list[list[int]]
    spans: list[tuple[int, int]]
    gold: int | None


def fewshot(items: list[dict], index: int, k: int) -> list[dict]:
    if k == 0:
        return []
    others = [i for i in range(len(items)) if i != index]
    return [items[i] for i in random.Random(FEWSHOT_SEED + index).sample(others, k)]


def prompts(task: Task, item: dict, shots: list[dict]) -> list[str]:
    """The item's prompts as text: one per choice or context option; language modeling: the prompt
    without its continuation (stripped), then with it."""
    d = task.delimiter
    if task.task_type == "multiple_choice":
        head = "".join(f"{s['query']}{d}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{head}{item['query']}{d}{choice}" for choice in item["choices"]]
    if task.task_type == "schema":
        head = "".join(f"{s['context_options'][s['gold']]}{d}{s['continuation']}\n\n" for s in shots)
        return [f"{head}{option}{d}{item['continuation']}" for option in item["context_options"]]
    head = "".join(f"{s['context'].strip()}{d}{s['continuation']}\n\n" for s in shots)
    prompt = f"{head}{item['context'].strip()}{d}"
    return [prompt.strip(), prompt + item["continuation"]]


def _common(rows: list[list[int]], reverse: bool = False) -> int:
    n = 0
    for column in zip(*(r[::-1] if reverse else r for r in rows)):
        if any(t != column[0] for t in column):
            break
        n += 1
    return n


def prepare(task: Task, index: int, block_size: int, enc=None) -> Prepared:
    """Item `index` of `task` as the model reads it."""
    enc = enc or get_tokenizer()
    item = task.items[index]
    texts = prompts(task, item, fewshot(task.items, index, task.num_fewshot))
    rows = [[enc.eot_token, *enc.encode_ordinary(t)] for t in texts]
    where = f"task {task.label}, item {index} (line {task.lines[index]})"
    if task.task_type == "multiple_choice":
        start = _common(rows)
        spans = [(start, len(r)) for r in rows]
    elif task.task_type == "schema":
        suffix = _common(rows, reverse=True)
        spans = [(len(r) - suffix, len(r)) for r in rows]
    else:
        without, rows = rows[0], rows[1:]
        if rows[0][: len(without)] != without or len(rows[0]) == len(without):
            raise CoreError(
                f"{where}: the prompt without its continuation is not a token prefix of the whole"
            )
        spans = [(len(without), len(rows[0]))]
    for k, (row, (s, e)) in enumerate(zip(rows, spans)):
        crop = max(0, len(row) - block_size)
        if s - crop < 1:
            raise CoreError(f"{where}: its continuation alone does not fit block_size={block_size}")
        rows[k], spans[k] = row[crop:], (s - crop, e - crop)
    return Prepared(rows, spans, item.get("gold"))


def tree(p: Prepared) -> Tree:
    """The item's rows as a packing tree: their common prefix once, each row's rest a branch."""
    shared = _common(p.rows) if len(p.rows) > 1 else len(p.rows[0])
    return Tree(p.rows[0][:shared], [r[shared:] for r in p.rows], p.spans)


def lowest(losses: list[float]) -> int:
    """Index of the lowest mean loss, as Python's min over a list picks it: the first on a tie; a
    nan (a prompt with no scored token) wins only in first place."""
    best = 0
    for i, loss in enumerate(losses):
        if loss < losses[best]:
            best = i
    return best


def judge(task: Task, p: Prepared, sums: list[float], counts: list[int], hits: list[bool]) -> dict:
    """Whether the model got the item right, from each row's summed log-probability, scored token
    count and whether greedy decoding gave every scored token."""
    if task.task_type == "language_modeling":
        return {"correct": bool(hits[0])}
    losses = [-s / c if c else math.nan for s, c in zip(sums, counts)]
    pred = lowest(losses)
    losses_json = [None if math.isnan(x) else x for x in losses]  # JSON has no nan
    return {"correct": pred == p.gold, "gold": p.gold, "pred": pred, "mean_losses": losses_json}


@torch.no_grad()
def evaluate_task(
    model: GPT,
    task: Task,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 16,
    dtype: str = "fp32",
    details: list | None = None,
    lockstep: bool = False,
    prepared: list[Prepared] | None = None,
) -> dict:
    """{n, correct, accuracy, centered} of one task, items sharded over ranks (item i on rank
    i % world_size) and the counts summed. `prepared`: this rank's items already tokenized (the
    training loop tokenizes once per run). `lockstep` (FSDP) runs as many forward passes on every
    rank. `details` gets a record per item of this rank."""
    mine = list(range(rank, len(task.items), world_size))
    if prepared is None:
        prepared = prepare_share([task], model.config.block_size, rank, world_size, device)[task.label]
    most = math.ceil(math.ceil(len(task.items) / world_size) / batch_size) if lockstep else 0
    was_training = model.training
    model.eval()
    with precision.autocast(torch.device(device), dtype):
        scores = score_trees(model, [tree(p) for p in prepared], device, batch_size, min_batches=most)
    model.train(was_training)
    correct = 0
    for i, p, (sums, counts, hits) in zip(mine, prepared, scores):
        verdict = judge(task, p, sums, counts, hits)
        correct += verdict["correct"]
        if details is not None:
            details.append({"task": task.label, "index": i, "line": task.lines[i], **verdict})
    n, correct = (int(c) for c in all_reduce_sum([len(mine), correct], device))
    accuracy = correct / max(n, 1)
    return {"n": n, "correct": correct, "accuracy": accuracy, "centered": centered(accuracy, task.baseline)}


def centered(accuracy: float, baseline_percent: float) -> float:
    """Accuracy rescaled so that guessing scores 0 and a perfect score 1 (DCLM's centered accuracy)."""
    b = 0.01 * baseline_percent
    return (accuracy - b) / (1.0 - b)


def core_metric(results: dict[str, dict]) -> float:
    """CORE: the mean centered accuracy over the tasks."""
    return sum(r["centered"] for r in results.values()) / len(results)


def evaluate(model: GPT, tasks: list[Task], **kw) -> dict:
    """Every task (keyword arguments as evaluate_task; `details` collects all of them); the results
    per task and CORE."""
    results = {t.label: evaluate_task(model, t, **kw) for t in tasks}
    return {"tasks": results, "core": core_metric(results)}


def summary(result: dict) -> str:
    """One line: CORE, what it covered, GPT-2's four scores."""
    reference = ", ".join(f"{size} {v:.4f}" for size, v in GPT2_CORE.items())
    return f"CORE {result['core']:.4f} ({len(result['tasks'])} tasks, {result['n']} items; GPT-2 {reference})"


def prepare_share(
    tasks: list[Task], block_size: int, rank: int, world_size: int, device: torch.device | str = "cpu"
) -> dict[str, list[Prepared]]:
    """This rank's items of each task, tokenized (item i on rank i % world_size). An item that cannot
    be scored stops every rank, its own error on the rank that holds it: none is left waiting."""
    enc, error, share = get_tokenizer(), None, {}
    try:
        for t in tasks:
            share[t.label] = [prepare(t, i, block_size, enc) for i in range(rank, len(t.items), world_size)]
    except CoreError as e:
        error = e
    stop_together(
        error, torch.device(device), CoreError("a CORE item cannot be scored (another rank names it)")
    )
    return share


class Suite:
    """The training loop's CORE: the tasks, and this rank's share of their items tokenized once."""

    def __init__(self, tasks: list[Task], block_size: int, info: DistInfo | None = None):
        self.tasks, self.lockstep = tasks, False
        self.rank, self.world_size = (info.rank, info.world_size) if info else (0, 1)
        device = info.device if info else "cpu"
        self.prepared = prepare_share(tasks, block_size, self.rank, self.world_size, device)

    @classmethod
    def for_run(cls, cfg: TrainConfig, info: DistInfo) -> Suite:
        """A training run's tasks (core_bundle, core_max_per_task); the main rank prints the notes."""
        loaded = load_bundle(cfg.core_bundle or None, None, cfg.core_max_per_task)
        if info.is_main:
            for note in loaded.notes:
                print(f"[gpt2repro] CORE: {note}")
        suite = cls(loaded.tasks, cfg.model.block_size, info)
        suite.lockstep = cfg.fsdp  # FSDP: every forward pass is a collective
        return suite

    def run(self, step: int, model: GPT, device: torch.device, dtype: str, logger) -> dict:
        """Evaluate at `step`, print the summary line and log a `core` event (a MetricsLogger);
        {core, core_step}."""
        result = self.evaluate(model, device, dtype, self.lockstep)
        logger.print(f"step {step:6d} | {summary(result)}")
        centered = {k: r["centered"] for k, r in result["tasks"].items()}
        logger.log("core", step, core=result["core"], n=result["n"], centered=centered)
        return {"core": result["core"], "core_step": step}

    def evaluate(self, model: GPT, device: torch.device, dtype: str, lockstep: bool = False) -> dict:
        """{tasks, core, n} over the ranks (each calls this with its share)."""
        results = {
            t.label: evaluate_task(
                model,
                t,
                device,
                self.rank,
                self.world_size,
                dtype=dtype,
                lockstep=lockstep,
                prepared=self.prepared[t.label],
            )
            for t in self.tasks
        }
        return {"tasks": results, "core": core_metric(results), "n": sum(r["n"] for r in results.values())}
