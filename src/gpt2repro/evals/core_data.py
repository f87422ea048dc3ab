"""The CORE metric's tasks, read from a DCLM eval bundle the way nanochat's base_eval.py reads them.

A bundle is a directory: `core.yaml` (`icl_tasks`: each task's `label`, `dataset_uri`,
`num_fewshot` (a list; its first value is used), `icl_task_type` and `continuation_delimiter`,
" " when absent), `eval_meta_data.csv` (`Eval Task`, `Random baseline` in percent) and
`eval_data/<dataset_uri>` (jsonl). Every file read is first checked against the sha256 recorded for
it in the bundle's manifest.json (`assets.verify_bundle_file`); a directory without one has it
recorded on first use. A task's items are shuffled with `random.Random(1337)` (nanochat's order, so
that `max_per_task` keeps the same items as nanochat's `--max-per-task`) and then cut to that many.
"""

from __future__ import annotations

import csv
import io
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..files import assets, jsonio

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337
# nanochat's measurements of OpenAI's GPT-2 (its "time to GPT-2" leaderboard's targets)
GPT2_CORE = {"124M": 0.1139, "355M": 0.1849, "774M": 0.2146, "1.5B": 0.2565}
# each task type's fields: the name, and whether it is a list of strings
FIELDS = {
    "multiple_choice": {"query": False, "choices": True, "gold": None},
    "schema": {"context_options": True, "continuation": False, "gold": None},
    "language_modeling": {"context": False, "continuation": False},
}


class CoreError(UserError, ValueError):
    """A malformed or incomplete eval bundle, or a bad CORE argument; the message names the file."""


@dataclass
class Task:
    """One CORE task: how its prompts are built, its random baseline (percent) and its items."""

    label: str
    task_type: str
    num_fewshot: int
    delimiter: str
    baseline: float
    items: list[dict] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # each item's line in its jsonl
    total: int = 0  # items in the file, before max_per_task


@dataclass
class Bundle:
    path: Path
    tasks: list[Task]
    notes: list[str]  # what the main rank should print (a manifest recorded, a subsample)


def _manifest(root: Path, notes: list[str]) -> dict[str, str]:
    manifest = assets.bundle_manifest(root)
    if manifest is None:
        try:
            manifest = assets.record_bundle(root, str(root))
        except OSError as e:
            raise CoreError(f"{root}: no {assets.BUNDLE_MANIFEST}, and it cannot be written: {e}") from None
        notes.append(
            f"{root}: recorded the sha256s of {len(manifest)} files in {assets.BUNDLE_MANIFEST} "
            "(first use: nothing to check them against); later runs refuse a changed file"
        )
    return manifest


def _read(root: Path, name: str, manifest: dict[str, str]) -> str:
    try:
        return assets.verify_bundle_file(root, name, manifest).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CoreError(f"{root / name}: not UTF-8 text") from None


def _task_entry(entry, where: str, baselines: dict[str, float]) -> Task:
    if not isinstance(entry, dict) or not all(
        isinstance(entry.get(k), str) for k in ("label", "dataset_uri", "icl_task_type")
    ):
        raise CoreError(f"{where}: each task needs string fields label, dataset_uri and icl_task_type")
    label, kind = entry["label"], entry["icl_task_type"]
    shots = entry.get("num_fewshot", [0])
    shots = shots[0] if isinstance(shots, list) and shots else shots
    delimiter = entry.get("continuation_delimiter", " ")
    if kind not in TASK_TYPES:
        raise CoreError(
            f"{where}: task {label}: icl_task_type {kind!r} is not one of {', '.join(TASK_TYPES)}"
        )
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0 or not isinstance(delimiter, str):
        raise CoreError(
            f"{where}: task {label}: num_fewshot must be [N >= 0], continuation_delimiter a string"
        )
    if label not in baselines:
        raise CoreError(f"{where}: task {label} has no row in eval_meta_data.csv")
    if not 0 <= baselines[label] < 100:  # centered accuracy divides by 100 - baseline
        raise CoreError(f"eval_meta_data.csv: task {label}: a random baseline must be in [0, 100) percent")
    return Task(label, kind, shots, delimiter, baselines[label])


def _items(task: Task, text: str, where: str) -> None:
    """Validated rows of a task's jsonl into task.items (blank lines skipped)."""
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = jsonio.loads(line)
        except jsonio.NotJSON as e:
            raise CoreError(f"{where}:{lineno}: {e.problem}") from None
        _check_item(row, task.task_type, f"{where}:{lineno}")
        task.items.append(row)
        task.lines.append(lineno)


def _check_item(row, kind: str, where: str) -> None:
    if not isinstance(row, dict):
        raise CoreError(f"{where}: expected a JSON object")
    for name, is_list in FIELDS[kind].items():
        value = row.get(name)
        if is_list is None:
            options = row.get("choices" if kind == "multiple_choice" else "context_options") or []
            ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(options)
        elif is_list:
            ok = isinstance(value, list) and value and all(isinstance(v, str) for v in value)
        else:
            ok = isinstance(value, str)
        if not ok:
            what = "an index into the options" if is_list is None else "strings" if is_list else "a string"
            raise CoreError(f"{where}: field {name!r} must be {what}, got {jsonio.shown(value)}")


def load_bundle(
    path: str | Path | None = None, tasks: list[str] | None = None, max_per_task: int = 0
) -> Bundle:
    """The tasks of the bundle at `path` (default: the cached download), in core.yaml's order, or
    only those named in `tasks`; each cut to `max_per_task` items (0: all) after the shuffle."""
    if isinstance(max_per_task, bool) or not isinstance(max_per_task, int) or max_per_task < 0:
        raise CoreError(f"max per task must be a number of items >= 0 (0: all), got {max_per_task!r}")
    root = Path(path) if path is not None else assets.fetch_core_bundle()
    if not root.is_dir():
        raise CoreError(
            f"{root}: no such directory (an eval bundle: core.yaml, eval_meta_data.csv, eval_data/)"
        )
    notes: list[str] = []
    manifest = _manifest(root, notes)
    import yaml

    try:
        config = yaml.safe_load(_read(root, "core.yaml", manifest))
        entries = config["icl_tasks"]
        rows = list(csv.DictReader(io.StringIO(_read(root, "eval_meta_data.csv", manifest))))
        baselines = {r["Eval Task"]: float(r["Random baseline"]) for r in rows}
    except yaml.YAMLError as e:
        raise CoreError(f"{root / 'core.yaml'}: not valid YAML ({str(e).splitlines()[0]})") from None
    except (KeyError, TypeError):
        raise CoreError(
            f"{root}: core.yaml needs an icl_tasks list, eval_meta_data.csv the columns "
            "'Eval Task' and 'Random baseline'"
        ) from None
    except ValueError as e:
        raise CoreError(f"{root / 'eval_meta_data.csv'}: a random baseline is not a number ({e})") from None
    if not isinstance(entries, list):
        raise CoreError(f"{root / 'core.yaml'}: icl_tasks must be a list")
    if not entries:
        raise CoreError(f"{root / 'core.yaml'}: icl_tasks is empty (CORE is a mean over at least one task)")
    chosen = [_task_entry(e, str(root / "core.yaml"), baselines) for e in entries]
    if tasks:
        unknown = sorted(set(tasks) - {t.label for t in chosen})
        if unknown:
            raise CoreError(
                f"unknown task(s) {', '.join(unknown)}; the bundle has {', '.join(t.label for t in chosen)}"
            )
        chosen = [t for t in chosen if t.label in tasks]
    for task, entry in zip(chosen, [e for e in entries if not tasks or e["label"] in tasks]):
        name = f"eval_data/{entry['dataset_uri']}"
        _items(task, _read(root, name, manifest), str(root / name))
        _subsample(task, max_per_task, str(root / name))
    if any(len(t.items) < t.total for t in chosen):
        notes.append(
            f"at most {max_per_task} items per task (nanochat's shuffle, seed {SHUFFLE_SEED}): not the full metric"
        )
    return Bundle(root, chosen, notes)


def _subsample(task: Task, max_per_task: int, where: str) -> None:
    task.total = len(task.items)
    order = list(range(task.total))
    random.Random(SHUFFLE_SEED).shuffle(order)
    order = order[:max_per_task] if max_per_task else order
    task.items, task.lines = [task.items[i] for i in order], [task.lines[i] for i in order]
    if len(task.items) <= task.num_fewshot:
        raise CoreError(
            f"{where}: task {task.label} keeps {len(task.items)} items, too few for {task.num_fewshot}-shot "
            f"prompts (needs {task.num_fewshot + 1}; raise the per-task maximum)"
        )
