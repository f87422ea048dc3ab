#!/usr/bin/env python
"""`make chat-demo`: supervised fine-tuning of the `make demo` model into a (very small) chat model,
on CPU in minutes, showing the mechanics: conversation data, the chat tokens, the masked loss, the
template, the chat command.

Conversations come from the local real text in ../shared/data (the same text the base model was
pretrained on, now in a chat format; never HellaSwag, which is an evaluation): "Tell me about
<title>." answered by the opening sentences of a WikiText-2 article, with follow-up turns about its
sections, and one Tiny Shakespeare speech answered by the next. The first rows are held out. It
reports the template adherence (greedy replies that end their turn) and the assistant-token loss
before and after, then answers one held-out question with `gpt2repro chat --message`. At 12M
parameters and a few minutes of CPU it is no assistant; adherence is what should rise.
Re-running resumes the fine-tune."""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from gpt2repro.checkpoint.gathered import load_model
from gpt2repro.cli import main as cli
from gpt2repro.config.presets import train_config
from gpt2repro.data.conversations import prepare_conversations
from gpt2repro.evals import chat as chat_eval
from gpt2repro.files import assets
from gpt2repro.model.gpt import GPT
from gpt2repro.training import sft

ROOT = Path(__file__).resolve().parents[1]
HEADING = re.compile(r"^ (=(?: =)*) (.+?) =(?: =)* $")  # " = Title = ", " = = Section = = ", ...


def detokenize(text: str) -> str:
    """WikiText's tokenized text back to ordinary prose."""
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" n't", "n't"), (" 's", "'s")):
        text = text.replace(a, b)
    text = re.sub(r" ([.,;:!?)\]])", r"\1", text)
    return re.sub(r"([(\[]) ", r"\1", text).strip()


def opening(paragraph: str, sentences: int) -> str | None:
    """The paragraph's first sentences as prose (WikiText's <unk> kept: the base model read them
    too); None when that is too short to be an answer."""
    kept = [p.strip().removesuffix(" .").strip() for p in paragraph.split(" . ")][:sentences]
    return detokenize(" . ".join(kept) + " .") if len(" ".join(kept).split()) >= 6 else None


def wikitext_articles(path: Path) -> list[tuple[str, list[tuple[str, str]]]]:
    """(title, [(section, first paragraph), ...]) per article; the introduction's section is ''."""
    articles: list[tuple[str, list[tuple[str, str]]]] = []
    section = None
    for line in path.read_text(encoding="utf-8").splitlines():
        heading = HEADING.match(line)
        if heading and heading[1] == "=":
            articles.append((detokenize(heading[2]), []))
            section = "" if "<unk>" not in heading[2] else None
        elif heading:
            section = detokenize(heading[2]) if "<unk>" not in heading[2] else None
        elif line.strip() and articles and section is not None:
            articles[-1][1].append((section, line.strip()))
            section = None  # one paragraph per section
    return articles


def wiki_conversations(paths: list[Path]) -> list[dict]:
    """ "Tell me about <title>." -> the article's opening, then a follow-up or two on its sections;
    each later section a question of its own."""
    out = []
    for path in paths:
        for title, sections in wikitext_articles(path):
            if "<unk>" in title:
                continue
            turns, singles = [], []
            for i, (section, paragraph) in enumerate(sections):
                answer = opening(paragraph, 2 if not section else 1)
                if answer is None or (i and not turns):
                    continue
                if i >= 3:
                    question = f"Tell me about the {section.lower()} of {title}."
                    singles.append(
                        {
                            "messages": [
                                {"role": "user", "content": question},
                                {"role": "assistant", "content": answer},
                            ]
                        }
                    )
                    continue
                question = f"Tell me about {title}." if not turns else f"What about its {section.lower()}?"
                turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            if turns:
                out += [{"messages": turns}, *singles]
    return out


def shakespeare_conversations(path: Path, max_words: int = 40) -> list[dict]:
    """One speech as the user's turn, the next as the reply (both short)."""
    speeches = [b.split("\n", 1)[1] for b in path.read_text().split("\n\n") if "\n" in b.strip()]
    pairs = zip(speeches, speeches[1:])
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in pairs
        if len(q.split()) <= max_words and len(a.split()) <= max_words
    ]


def conversations(out: Path) -> tuple[Path, dict]:
    """The demo's conversations as JSONL (shuffled, so the held-out rows hold both kinds); and one
    held-out WikiText question to ask at the end."""
    mirror = assets.mirror_dir()
    wiki = sorted((mirror / "wikitext-2").glob("*.txt")) if mirror is not None else []
    records = wiki_conversations(wiki)
    dialogue = shakespeare_conversations(assets.fetch("tinyshakespeare.txt"))
    records += dialogue[: max(2 * len(records), 500)]  # a mix (and dialogue alone without WikiText-2)
    random.Random(0).shuffle(records)
    path = out / "conversations.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    held_out = next(r for r in records[:10] if r["messages"][0]["content"].startswith("Tell me about"))
    return path, held_out


def base_model(base: Path, seconds: float) -> Path:
    """The `make demo` run, trained now if absent."""
    if not (base / "checkpoints").is_dir():
        print(f"   no base model at {base}: training one with scripts/demo.py ({seconds:.0f}s budget)")
        cmd = [
            sys.executable,
            str(ROOT / "scripts" / "demo.py"),
            "--out",
            str(base.parent),
            "--seconds",
            str(seconds),
        ]
        subprocess.run(cmd, check=True)
    return base


def before_sft(base: Path, cfg, data: Path, limit: int, tokens: int) -> dict:
    """The base model with the chat tokens added, exactly as the fine-tune's step 0 starts."""
    torch.manual_seed(cfg.seed)
    pretrained = load_model(base)
    model = GPT(pretrained.config.as_chat())
    model.copy_weights_from(pretrained)
    return chat_eval.evaluate(model, data, limit=limit, max_new_tokens=tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/chat-demo")
    parser.add_argument("--base", default="runs/demo/run", help="the pretrained run (make demo's)")
    parser.add_argument("--base-seconds", type=float, default=480, help="its training budget if absent")
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps")
    parser.add_argument(
        "--seconds",
        type=float,
        default=300,
        help="fine-tuning time budget (training seconds; the schedule fits it)",
    )
    parser.add_argument("--limit", type=int, default=40, help="held-out conversations for adherence")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="a reply must end within this")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for the sft preset")
    args = parser.parse_args()
    out, started = Path(args.out), time.time()

    print("== 1/5 conversations from WikiText-2 and Tiny Shakespeare")
    source, question = conversations(out)
    base = base_model(Path(args.base), args.base_seconds)
    seq_len = load_model(base).config.block_size
    m = prepare_conversations(
        [str(source)], out / "data", seq_len=seq_len, val_tokens=16 * seq_len, progress=False
    )
    c = m["counts"]
    print(
        f"   {c['conversations']:,} conversations in {c['rows']:,} rows of {seq_len} tokens ({c['trained_tokens']:,} learned), "
        f"{c['truncated']} truncated, {c['too_long']} too long; 16 rows held out"
    )

    cfg = train_config(
        "sft",
        [f"init_from={base}", f"seq_len={seq_len}", "micro_batch_size=8", f"total_batch_size={8 * seq_len}"]
        + [f"max_steps={args.steps}", "max_lr=1e-3", "warmup_steps=10", "val_every=25", "val_steps=2"]
        + ["sample_every=100", "sample_tokens=48", "ckpt_every=50", "dtype=auto", "compile=false"]
        + ["log_every=25", "schedule_clock=time", f"time_budget={args.seconds}", *args.overrides],
    )
    print("== 2/5 before fine-tuning: the base model with the chat tokens added")
    before = before_sft(base, cfg, out / "data", args.limit, args.max_new_tokens)
    print(f"   {chat_eval.summary(before)}")

    print(
        f"== 3/5 fine-tune (sft preset, {args.steps} steps or {args.seconds:.0f}s, loss on the assistant's tokens only)"
    )
    sft.train(cfg, out / "data", out / "run")

    print("== 4/5 after fine-tuning")
    after = chat_eval.evaluate(
        load_model(out / "run"), out / "data", limit=args.limit, max_new_tokens=args.max_new_tokens
    )
    print(f"   {chat_eval.summary(after)}")

    print("== 5/5 one held-out question, through `gpt2repro chat --message`")
    ask = question["messages"][0]["content"]
    print(f"   you> {ask}\n   assistant> ", end="", flush=True)
    cli(
        [
            "chat",
            "--checkpoint",
            str(out / "run"),
            "--message",
            ask,
            "--temperature",
            "0",
            "--max-new-tokens",
            "96",
        ]
    )
    print(f"   (the article says: {question['messages'][1]['content']})")
    print(
        f"   template adherence {before['adherence']:.2f} -> {after['adherence']:.2f}, assistant-token loss "
        f"{before['loss']:.2f} -> {after['loss']:.2f}"
    )
    print(f"   chat with it: .venv/bin/gpt2repro chat --checkpoint {out / 'run'}")
    print(f"   total time: {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
