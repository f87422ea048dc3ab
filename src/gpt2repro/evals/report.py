"""`gpt2repro eval hellaswag` behind the command line: score one or both styles, then report the
summary, a few worked examples, the results JSON and the per-example predictions. Output paths are
checked before the model runs, so a typo never costs a whole evaluation."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..files.fsio import WriteError, atomic_write_text
from ..model.gpt import GPT
from ..parallel.distributed import DistInfo
from .hellaswag import STYLES, HellaSwagError, evaluate


def check_output_paths(*paths: str | None) -> None:
    for path in paths:
        if path is not None and not Path(path).parent.is_dir():
            raise HellaSwagError(f"{path}: directory {Path(path).parent} does not exist")
        if path is not None and not os.access(Path(path).parent, os.W_OK):
            raise HellaSwagError(f"{path}: directory {Path(path).parent} is not writable")


def write_outputs(outputs: list[tuple[str | None, str, str]]) -> None:
    """Write (path, text, what) atomically; the scores are printed already, so a full disk loses
    only the files, and its error says so."""
    for path, text, what in outputs:
        if path:
            try:
                atomic_write_text(path, text, what)
            except WriteError as e:
                raise WriteError(f"{e}; the scores are printed above") from None


def gathered(details: list[dict], info: DistInfo) -> list[dict]:
    """Every rank's per-example records (each rank scores a share), so the main rank writes them all."""
    if not info.distributed:
        return details
    import torch.distributed as dist

    shares: list = [None] * info.world_size
    dist.all_gather_object(shares, details)
    return [d for share in shares for d in share]


def worked_examples(examples: list[dict], details: list[dict], n: int = 3) -> str:
    lines = []
    for d in details[:n]:
        ex = examples[d["index"]]
        lines.append(f"\n--- example {d['index']} (label {d['label']}, predicted {d['pred_norm']}) ---")
        lines.append(f"ctx: {ex['ctx']}")
        for i, end in enumerate(ex["endings"]):
            lines.append(f"  {i} logprob={d['logprob_sums'][i]:.4f} norm={d['norm_scores'][i]:.4f}  {end}")
    return "\n".join(lines)


def run_hellaswag(
    model: GPT,
    examples: list[dict],
    style: str,
    info: DistInfo,
    batch_size: int = 32,
    dtype: str = "fp32",
    verbose: bool = False,
    json_out: str | None = None,
    predictions: str | None = None,
) -> dict[str, dict]:
    """Evaluate in `style` (or `both`), print and write the reports on the main rank; the results."""
    styles = STYLES if style == "both" else (style,)
    results, details = {}, {}
    for s in styles:
        details[s] = []
        results[s] = evaluate(
            model, examples, s, info.device, info.rank, info.world_size, batch_size, dtype, details=details[s]
        )
        details[s] = sorted(gathered(details[s], info), key=lambda d: d["index"])
    if not info.is_main:
        return results
    for s, r in results.items():
        print(f"hellaswag [{s}] n={r['n']} acc={r['acc']:.4f} acc_norm={r['acc_norm']:.4f}")
    if verbose:
        print(worked_examples(examples, details[styles[0]]))
    rows = [{"style": s, **d} for s in styles for d in details[s]]
    lines = "".join(json.dumps(r) + "\n" for r in rows) if predictions else ""
    write_outputs(
        [(json_out, json.dumps(results, indent=2), "the results"), (predictions, lines, "the predictions")]
    )
    return results


def run_harness_tasks(
    model: GPT,
    tasks: list[str],
    info: DistInfo,
    limit: int | None,
    include_path: str | None,
    batch_size: int,
    dtype: str,
    json_out: str | None,
    apply_chat_template: bool = False,
) -> dict[str, dict[str, float]]:
    """lm-eval tasks on one process: print one line per task, write the JSON."""
    from .harness import run_harness  # here: decoding's imports cost every `eval` ~1 s of start-up

    results = run_harness(
        model, tasks, info.device, limit, include_path, batch_size, dtype, apply_chat_template
    )
    if info.is_main:
        for task, metrics in results.items():
            print(f"{task}: " + " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
        write_outputs([(json_out, json.dumps(results, indent=2), "the results")])
    return results


def run_chat(
    model: GPT, data_dir: str, limit: int, max_new_tokens: int, batch_size: int, json_out: str | None
) -> dict:
    """`eval chat`: print the summary line, write the JSON."""
    from .chat import evaluate as evaluate_chat
    from .chat import summary as chat_summary

    result = evaluate_chat(model, data_dir, limit, max_new_tokens, batch_size)
    print(chat_summary(result))
    if json_out:
        atomic_write_text(json_out, json.dumps(result, indent=2))
    return result


def core_table(results: dict, tasks: list, notes: list[str]) -> str:
    """Per task: accuracy, centered accuracy, items scored (of the file's); then CORE beside GPT-2's."""
    from .core import GPT2_CORE

    width = max(len(t.label) for t in tasks)
    lines = [f"{'task':{width}}  {'type':17}  shots  accuracy  centered  examples"]
    for t in tasks:
        r = results["tasks"][t.label]
        of = "" if r["n"] == t.total else f" of {t.total}"
        lines.append(
            f"{t.label:{width}}  {t.task_type:17}  {t.num_fewshot:5d}  {r['accuracy']:8.4f}  "
            f"{r['centered']:8.4f}  {r['n']}{of}"
        )
    reference = "  ".join(f"{size} {score:.4f}" for size, score in GPT2_CORE.items())
    lines.append(f"CORE {results['core']:.4f} over {len(tasks)} tasks  (GPT-2 {reference})")
    return "\n".join(notes + lines)


def run_core(
    model: GPT,
    bundle,
    info: DistInfo,
    batch_size: int = 16,
    dtype: str = "fp32",
    json_out: str | None = None,
    predictions: str | None = None,
) -> dict:
    """`eval core`: every task sharded over the ranks; the main rank prints the table and writes the
    results and every rank's per-item predictions."""
    from .core import evaluate

    details: list[dict] = []
    results = evaluate(
        model,
        bundle.tasks,
        device=info.device,
        rank=info.rank,
        world_size=info.world_size,
        batch_size=batch_size,
        dtype=dtype,
        details=details,
    )
    details = gathered(details, info) if predictions else details
    if not info.is_main:
        return results
    print(core_table(results, bundle.tasks, bundle.notes))
    order = {t.label: i for i, t in enumerate(bundle.tasks)}
    details.sort(key=lambda d: (order[d["task"]], d["index"]))
    lines = "".join(json.dumps(d) + "\n" for d in details) if predictions else ""
    for t in bundle.tasks:  # what each number was measured on, for the JSON
        results["tasks"][t.label].update(
            type=t.task_type, shots=t.num_fewshot, baseline=t.baseline, items=t.total
        )
    results = {**results, "bundle": str(bundle.path), "notes": bundle.notes}
    write_outputs(
        [(json_out, json.dumps(results, indent=2), "the results"), (predictions, lines, "the predictions")]
    )
    return results
