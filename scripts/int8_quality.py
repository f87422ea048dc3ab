#!/usr/bin/env python
"""Int8 weights' quality against fp32 on real text (benchmarks/RESULTS.md, issue #42): the
validation loss of each, and greedy agreement over 256 tokens, for a run's checkpoint or a random
model of a bench size.

- loss: the mean next-token loss over non-overlapping windows of the text (its first `--tokens`);
  the int8 model is `for_decoding(model, "int8")`, whose forward computes with exactly the values its
  decoding steps read as int8 (tests/test_int8.py); where this CPU decodes int8 through the VNNI
  kernel, each of its Linears' inputs is rounded as that kernel rounds them (`round_activations`),
  so the loss is the decoding steps' arithmetic.
- teacher-forced agreement: the share of the text's positions where both models' top tokens agree.
- free-running agreement: from each of `--prompts` windows' first 16 tokens, 256 greedy tokens by
  `generate` (the int8 model through its int8 decoding steps): tokens equal before the first
  difference, and the share of equal tokens position by position.

    PYTHONPATH=src python scripts/int8_quality.py --checkpoint RUN --text ../shared/data/wikitext-2/valid.txt
    PYTHONPATH=src python scripts/int8_quality.py --size 124m --text ../shared/data/wikitext-2/valid.txt
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from gpt2repro.bench.common import size_config
from gpt2repro.checkpoint.gathered import load_model
from gpt2repro.generation import cpu_kernels
from gpt2repro.generation.decoding import for_decoding
from gpt2repro.generation.generate import generate
from gpt2repro.generation.sampling import GREEDY
from gpt2repro.model.gpt import GPT
from gpt2repro.text.tokenizer import get_tokenizer


def windows(text: str, length: int, tokens: int) -> torch.Tensor:
    ids = get_tokenizer().encode_ordinary(text)[: tokens + 1]
    n = (len(ids) - 1) // length
    return torch.tensor(ids[: n * length + 1])


def loss_and_agreement(model: GPT, ids: torch.Tensor, length: int) -> tuple[float, torch.Tensor]:
    n = (ids.numel() - 1) // length
    x = ids[:-1].view(n, length)
    y = ids[1:].view(n, length)
    total, tops = 0.0, []
    with torch.no_grad():
        for i in range(n):
            logits = model(x[i : i + 1])[0][0, :, : model.config.vocab_size].float()
            total += F.cross_entropy(logits, y[i]).item()
            tops.append(logits.argmax(-1))
    return total / n, torch.cat(tops)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint")
    src.add_argument("--size", help="a random model of this bench size (seed 0)")
    p.add_argument("--text", required=True, help="a plain-text file (e.g. WikiText-2's valid.txt)")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--prompts", type=int, default=4)
    args = p.parse_args()
    if args.checkpoint:
        fp32 = load_model(args.checkpoint).eval()
    else:
        torch.manual_seed(0)
        fp32 = GPT(size_config(args.size)[0]).eval()
    int8 = for_decoding(copy.deepcopy(fp32), "int8")
    rounded = cpu_kernels.vnni()
    scored = cpu_kernels.rounding_linear_inputs(copy.deepcopy(int8)) if rounded else int8
    length = min(fp32.config.block_size, 1024)
    ids = windows(Path(args.text).read_text(encoding="utf-8"), length, args.tokens)
    (loss32, top32), (loss8, top8) = (loss_and_agreement(m, ids, length) for m in (fp32, scored))
    runs, same = [], []
    for i in range(args.prompts):
        prompt = ids[i * length : i * length + 16][None]
        a, b = (generate(m, prompt, 256, sampling=GREEDY)[0, 16:] for m in (fp32, int8))
        differ = (a != b).nonzero()
        runs.append(int(differ[0]) if differ.numel() else 256)
        same.append((a == b).float().mean().item())
    print(
        json.dumps(
            {
                "model": args.checkpoint or f"random {args.size} (seed 0)",
                "text": args.text,
                "int8_activations": "rounded to int8 per 32 (VNNI kernel)" if rounded else "fp32 (loop)",
                "tokens": ids.numel() - 1,
                "loss_fp32": loss32,
                "loss_int8": loss8,
                "loss_change": loss8 / loss32 - 1,
                "top1_agreement_teacher_forced": (top32 == top8).float().mean().item(),
                "greedy_256_equal_prefix": runs,
                "greedy_256_same_position": same,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
