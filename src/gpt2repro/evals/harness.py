"""Any lm-evaluation-harness task on a model of ours, through lm-eval's Python API (the `eval`
extra): `gpt2repro eval harness --tasks hellaswag,arc_easy,...`.

`GPT2ReproLM` answers the harness's three request kinds with our model and tokenizer: log-likelihoods
of continuations (contexts and continuations tokenized as the harness does), rolling log-likelihoods
of whole documents (the harness's own windowing), and greedy generation. Task data comes from the
hub, or from local files when a task's YAML says so (`--include-path`)."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

from ..errors import UserError
from ..generation.generate import generate
from ..generation.sampling import GREEDY
from ..model.gpt import GPT
from ..model.precision import autocast
from ..text import chat
from ..text.tokenizer import EOT_ID, get_tokenizer
from .hellaswag import harness_pair


class HarnessError(UserError, ValueError):
    """The harness is missing, or a task or argument it cannot take; one line."""


def _lm_base():
    try:
        from lm_eval.api.model import LM
    except ImportError:
        raise HarnessError(
            "eval harness needs lm-evaluation-harness: pip install 'gpt2repro[eval]'"
        ) from None
    return LM


@torch.no_grad()
def score_tokens(
    model: GPT, pairs: list[tuple[list[int], list[int]]], batch_size: int, device: torch.device, dtype: str
) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per
    (context ids, continuation ids) pair; inputs longer than block_size keep their last tokens.
    Right-padded batches, longest first; the lm_head only at the scored positions."""
    block = model.config.block_size
    rows = []
    for ctx, cont in pairs:
        tokens = (ctx + cont)[-(block + 1) :]
        rows.append((tokens[:-1], tokens[len(tokens) - len(cont) :]))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    model.eval()
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = len(rows[batch[0]][0])
        idx = torch.zeros(len(batch), width, dtype=torch.long)
        for r, i in enumerate(batch):
            idx[r, : len(rows[i][0])] = torch.tensor(rows[i][0])
        with autocast(device, dtype):
            h = model.hidden(idx.to(device))
        for r, i in enumerate(batch):
            inputs, targets = rows[i]
            at = torch.arange(len(inputs) - len(targets), len(inputs), device=device)
            logits = model.logits(h[r, at]).float().log_softmax(-1)
            t = torch.tensor(targets, device=device)
            out[i] = (float(logits.gather(1, t[:, None]).sum()), bool((logits.argmax(-1) == t).all()))
    return out


class _ChatText:
    """The tokenizer's interface for prompts rendered through the chat template: their spelled-out
    chat tokens become the tokens themselves."""

    def encode_ordinary(self, text: str) -> list[int]:
        return chat.encoding().encode(text, allowed_special="all")

    def decode(self, ids: list[int]) -> str:
        return chat.decode(ids)


def make_lm(
    model: GPT, device: torch.device, batch_size: int = 16, dtype: str = "fp32", chat_template: bool = False
):
    """An lm-eval `LM` backed by our model; `chat_template`: the harness renders prompts with ours
    (`chat.render_text`), and generation stops at the end of the assistant's turn too."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    enc = _ChatText() if chat_template else get_tokenizer()

    class GPT2ReproLM(_lm_base()):
        tokenizer_name = "gpt2repro-chat"

        def chat_template(self, chat_template=False) -> str:
            return chat.CHAT_TEMPLATE

        def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
            return chat.render_text(chat_history, add_generation_prompt)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            pairs = []
            for context, continuation in (r.args for r in requests):
                if context:
                    pairs.append(harness_pair(enc, context, continuation))
                else:  # the harness conditions an empty context on the end-of-text token
                    pairs.append(([EOT_ID], enc.encode_ordinary(continuation)))
            return score_tokens(model, pairs, batch_size, device, dtype)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            block = model.config.block_size
            windows, owners = [], []
            for n, (text,) in enumerate(r.args for r in requests):
                for window in get_rolling_token_windows(enc.encode_ordinary(text), EOT_ID, block, 1):
                    windows.append(make_disjoint_window(window))
                    owners.append(n)
            totals = [0.0] * len(requests)
            for n, (logprob, _) in zip(owners, score_tokens(model, windows, batch_size, device, dtype)):
                totals[n] += logprob
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False):
            texts = []
            for context, kwargs in (r.args for r in requests):
                until = kwargs.get("until") or [enc.decode([EOT_ID])]
                until = [until] if isinstance(until, str) else until
                until = [*until, chat.ASSISTANT_END] if chat_template else until
                ids = enc.encode_ordinary(context)[-(model.config.block_size - 1) :]
                steps = min(int(kwargs.get("max_gen_toks", 256)), model.config.block_size - len(ids))
                with autocast(device, dtype):
                    out = generate(model, torch.tensor([ids], device=device), steps, sampling=GREEDY)
                text = enc.decode(out[0, len(ids) :].tolist())
                texts.append(min((text.split(stop)[0] for stop in until), key=len))
            return texts

    return GPT2ReproLM()


def run_harness(
    model: GPT,
    tasks: list[str],
    device: torch.device,
    limit: int | None = None,
    include_path: str | None = None,
    batch_size: int = 16,
    dtype: str = "fp32",
    apply_chat_template: bool = False,
) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for lm-eval tasks by name (local task YAMLs from `include_path`);
    `apply_chat_template`: a chat model's prompts through its template."""
    lm = make_lm(
        model, device, batch_size, dtype, apply_chat_template
    )  # first: a missing extra is the first error
    if apply_chat_template and not model.config.chat:
        raise HarnessError(
            "--apply-chat-template needs a chat model (model.chat=true); this one is a base model"
        )
    from lm_eval import simple_evaluate

    if limit is not None and limit < 1:
        raise HarnessError(f"limit must be at least 1, got {limit}")
    if include_path is not None and not Path(include_path).is_dir():
        raise HarnessError(f"include_path {include_path}: not a directory")
    manager = _task_manager(include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown or not tasks:
        raise HarnessError(f"unknown lm-eval task(s): {', '.join(unknown) or '(none given)'}")
    out = simple_evaluate(
        model=lm,
        tasks=tasks,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        apply_chat_template=apply_chat_template,
    )
    return {
        task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, float) and not math.isnan(v)}
        for task, metrics in out["results"].items()
    }


def _task_manager(include_path: str | None):
    """lm-eval's index of its tasks, built once a process for the same task files: building it reads
    every task's YAML (~6 s), and a process that evaluates twice (the tests, the API) would read them
    all again. An edited local task file is indexed anew."""
    files = sorted(Path(include_path).rglob("*.y*ml")) if include_path else []
    return _indexed(include_path, tuple((str(f), f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=4)
def _indexed(include_path: str | None, _stamp: tuple):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path) if include_path else TaskManager()
