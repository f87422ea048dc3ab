"""The `gpt2repro` command: prepare, train, eval, sample, chat, export, plot, bench, presets.

Every known kind of bad input ends in one line on stderr, `gpt2repro: error: ...`, and exit code 2.
Output piped into a reader that stops early (`| head`) ends quietly. Everything that needs torch
is imported by the command that uses it, so `--help`, `--version` and `presets` start at once."""

from __future__ import annotations

import argparse
import math
import os
import select
import sys
from pathlib import Path

from . import __version__
from .bench.names import BASELINES, SIZES, TRAIN_MODES, WHAT
from .config import DTYPE_NAMES, ConfigError
from .errors import UserError
from .presets import TRAIN_PRESETS

SIGPIPE_EXIT = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader went away


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll says POLLERR), as after `| head`."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, ValueError, OSError):  # no poll (Windows), or stdout is no file
        return False


def _add_model_source(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="run directory or checkpoint directory of ours")
    src.add_argument("--hf", help="Hugging Face GPT-2 directory, or hub name (gpt2 ... gpt2-xl)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")


def _load(args, device):
    from .checkpoint import load_model
    from .hf import load_hf
    from .precision import enable_tf32

    enable_tf32(device)

    return load_model(args.checkpoint, device) if args.checkpoint else load_hf(args.hf).to(device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpt2repro", description="GPT-2 reproduced from scratch in PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"gpt2repro {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "prepare", help="tokenize a corpus (FineWeb-EDU, any HF data set, local files) into shards"
    )
    p.add_argument(
        "--source",
        nargs="+",
        required=True,
        help="'fineweb-edu', 'hf:NAME' (any Hugging Face data set, streamed), a directory saved with "
        "datasets' save_to_disk, or local files/globs/directories (.parquet .jsonl[.gz] .json.gz .txt)",
    )
    p.add_argument(
        "--name", default=None, help="the data set's config (FineWeb-EDU: sample-10BT (default), ...)"
    )
    p.add_argument("--split", default="train", help="the split of a hub or saved data set")
    p.add_argument("--revision", default=None, help="dataset revision (commit) for reproducibility")
    p.add_argument("--out", required=True)
    p.add_argument("--text-field", default="text")
    p.add_argument("--shard-tokens", type=int, default=100_000_000)
    p.add_argument(
        "--val-tokens", type=int, default=None, help="tokens in the val split (default: one shard)"
    )
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument(
        "--chat",
        nargs="?",
        const="auto",
        choices=("auto", "messages", "sharegpt", "instruction"),
        help="conversations (rows with loss masks) in this layout; alone: detected per record",
    )
    p.add_argument("--seq-len", type=int, default=1024, help="--chat: tokens per row (the training seq_len)")
    p.add_argument("--skip-bad", action="store_true", help="--chat: leave bad records out, counted")

    p = sub.add_parser("train", help="train (single process or under torchrun)")
    p.add_argument("--preset", help=f"one of: {', '.join(TRAIN_PRESETS)} (or named by the --config file)")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="a config file (.toml, or a run's config.json): its keys override the preset's",
    )
    p.add_argument("--data", required=True, help="directory of train_*/val_* shards")
    p.add_argument("--out", required=True, help="run directory (config, checkpoints, metrics)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="require a checkpoint to continue from (resume=require); by default a run resumes if it can",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="key=value overrides of the preset and file, e.g. max_steps=100 model.n_layer=4",
    )

    p = sub.add_parser("sample", help="sample text from a model")
    _add_model_source(p)
    p.add_argument("--prompt", default="Hello, I'm a language model,")
    p.add_argument("-n", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--weight-dtype",
        choices=DTYPE_NAMES,
        default="fp32",
        help="cast the weights themselves (faster decoding on GPUs and for batches)",
    )

    p = sub.add_parser(
        "chat", help="talk to a chat model (streamed replies, the conversation kept in the KV cache)"
    )
    _add_model_source(p)
    p.add_argument("--message", default=None, help="answer this once and exit (scripts)")
    p.add_argument("--system", default=None, help="a system message opening the conversation")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per reply at most")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--weight-dtype", choices=DTYPE_NAMES, default="fp32", help="cast the weights themselves")

    p = sub.add_parser("export", help="export a checkpoint to a Hugging Face transformers directory")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)

    p = sub.add_parser("eval", help="evaluate a model")
    ev = p.add_subparsers(dest="task", required=True)
    h = ev.add_parser("hellaswag", help="HellaSwag validation (10,042 examples)")
    _add_model_source(h)
    h.add_argument(
        "--data", default=None, help="a HellaSwag jsonl(.gz) (default: the official validation file)"
    )
    h.add_argument("--style", choices=("completion", "harness", "both"), default="completion")
    h.add_argument("--limit", type=int, default=None)
    h.add_argument("--batch-size", type=int, default=32, help="examples per forward pass")
    h.add_argument(
        "--autocast-dtype",
        choices=DTYPE_NAMES,
        default="fp32",
        help="autocast for the forward passes; weights stay fp32",
    )
    h.add_argument("--json", dest="json_out", default=None, help="write the results here")
    h.add_argument("--predictions", default=None, help="write per-example predictions (jsonl) here")
    h.add_argument("--verbose", action="store_true", help="print a few worked examples")

    h = ev.add_parser("harness", help="any lm-evaluation-harness task (needs the eval extra)")
    _add_model_source(h)
    h.add_argument(
        "--tasks", required=True, help="comma-separated lm-eval task names, e.g. hellaswag,arc_easy"
    )
    h.add_argument("--limit", type=int, default=None, help="examples per task")
    h.add_argument("--include-path", default=None, help="a directory of extra task YAMLs (local data)")
    h.add_argument("--batch-size", type=int, default=16)
    h.add_argument("--autocast-dtype", choices=DTYPE_NAMES, default="fp32")
    h.add_argument("--json", dest="json_out", default=None, help="write the results here")
    h.add_argument(
        "--apply-chat-template", action="store_true", help="a chat model: prompts through its chat template"
    )

    h = ev.add_parser(
        "chat", help="a chat model on held-out conversations: assistant-token loss, template adherence"
    )
    _add_model_source(h)
    h.add_argument("--data", required=True, help="a `prepare --chat` directory (its val split is read)")
    h.add_argument("--limit", type=int, default=100, help="conversations whose first reply is generated")
    h.add_argument(
        "--max-new-tokens", type=int, default=64, help="N: a reply must end its turn within N tokens"
    )
    h.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (the loss)")
    h.add_argument("--json", dest="json_out", default=None, help="write the results here")

    p = sub.add_parser("plot", help="plot a run's losses and HellaSwag")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")

    p = sub.add_parser("bench", help="measure speed (see benchmarks/RESULTS.md)")
    p.add_argument("what", choices=WHAT)
    p.add_argument(
        "--size", default="4x256", choices=SIZES, help="layers x width (see benchmarks/RESULTS.md)"
    )
    p.add_argument(
        "--mode", default="all", help=f"{'|'.join(TRAIN_MODES)}|all, or several with commas (train)"
    )
    p.add_argument("--baseline", default="none", choices=BASELINES)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--presets", default="cpu-tiny,cpu-demo", help="learn: the training presets (model sizes)")
    p.add_argument("--steps", type=int, default=200, help="learn: the token budget, in optimizer steps")
    p.add_argument("--seeds", type=int, default=2, help="learn: runs per setting")
    p.add_argument("--data", default=None, help="learn: shards (default: Tiny Shakespeare + WikiText-2)")
    p.add_argument("--plot", default=None, help="learn: write val loss against tokens here (PNG)")
    p.add_argument(
        "--lr-factors", default="0.5,1,2", help="learn: multiples of each optimizer's default LR to sweep"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="learn: for every run")
    p.add_argument(
        "--recipe", action="append", default=[], metavar="KEY=VALUE", help="learn: for the Muon runs only"
    )

    p = sub.add_parser(
        "verify", help="check a data directory's shards or a run's checkpoints against their sha256s"
    )
    p.add_argument(
        "path", help="a directory made by `prepare` (manifest.json) or a run directory (checkpoints/)"
    )

    p = sub.add_parser(
        "presets", help="list the training presets, print one's resolved config, or document every key"
    )
    p.add_argument("name", nargs="?", help="print this preset's resolved config, ready for --config")
    p.add_argument("overrides", nargs="*", help="key=value overrides to resolve with it")
    p.add_argument("--config", metavar="FILE", help="resolve this config file (as train --config would)")
    p.add_argument("--format", choices=("toml", "json"), default="toml", help="of the printed config")
    p.add_argument("--keys", action="store_true", help="every key: type, default and meaning")
    return parser


def cmd_prepare(args) -> None:
    if args.chat:
        _prepare_chat(args)
        return
    from .data.prepare import prepare

    m = prepare(
        args.source,
        args.out,
        name=args.name,
        split=args.split,
        revision=args.revision,
        text_field=args.text_field,
        shard_tokens=args.shard_tokens,
        val_tokens=args.val_tokens,
        max_tokens=args.max_tokens,
        workers=args.workers,
    )
    print(
        f"{args.out}: {m['total_tokens']:,} tokens from {m['documents']:,} documents in {len(m['shards'])} shards"
    )


def _prepare_chat(args) -> None:
    from .data.conversations import prepare_conversations

    kw = dict(name=args.name, split=args.split, revision=args.revision, shard_tokens=args.shard_tokens)
    kw.update(val_tokens=args.val_tokens, max_tokens=args.max_tokens, seq_len=args.seq_len)
    m = prepare_conversations(args.source, args.out, layout=args.chat, skip_bad=args.skip_bad, **kw)
    c = m["counts"]
    print(
        f"{args.out}: {c['conversations']:,} conversations in {c['rows']:,} rows of {args.seq_len} tokens "
        f"({c['trained_tokens']:,} learned); truncated {c['truncated']:,}, too long {c['too_long']:,}, "
        f"bad {c['bad']:,}"
    )


def cmd_train(args) -> None:
    from .presets import train_config

    overrides = args.overrides + (["resume=require"] if args.resume else [])
    cfg = train_config(args.preset, overrides, args.config)
    if cfg.model.chat:  # conversations, the masked loss
        from .sft import train
    else:
        from .train import train
    train(cfg, args.data, args.out)


def cmd_sample(args) -> None:
    from .distributed import pick_device
    from .generate import sample_text
    from .precision import torch_dtype

    device = pick_device(args.device)
    model = _load(args, device).to(torch_dtype(args.weight_dtype))
    for text in sample_text(
        model, args.prompt, args.n, args.max_new_tokens, args.temperature, args.top_k, args.seed
    ):
        print(f"> {text}")


def cmd_chat(args) -> None:
    from .chat_cli import run
    from .distributed import pick_device
    from .precision import torch_dtype

    model = _load(args, pick_device(args.device)).to(torch_dtype(args.weight_dtype))
    sampling = dict(max_new_tokens=args.max_new_tokens, top_k=args.top_k, temperature=args.temperature)
    run(model, args.message, args.system, seed=args.seed, **sampling)


def cmd_export(args) -> None:
    from .hf import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out)
    print(f"exported to {out} (load with transformers.GPT2LMHeadModel.from_pretrained)")


def cmd_eval(args) -> None:
    from .distributed import setup, teardown
    from .evals import report

    info = setup(args.device)
    try:
        report.check_output_paths(args.json_out, getattr(args, "predictions", None))
        model = _load(args, info.device)
        if args.task == "chat":
            report.run_chat(model, args.data, args.limit, args.max_new_tokens, args.batch_size, args.json_out)
            return
        if args.task == "harness":
            tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
            report.run_harness_tasks(
                model,
                tasks,
                info,
                args.limit,
                args.include_path,
                args.batch_size,
                args.autocast_dtype,
                args.json_out,
                args.apply_chat_template,
            )
            return
        from .evals import hellaswag

        examples = hellaswag.load_examples(args.data, args.limit)
        report.run_hellaswag(
            model,
            examples,
            args.style,
            info,
            args.batch_size,
            args.autocast_dtype,
            args.verbose,
            args.json_out,
            args.predictions,
        )
    finally:
        teardown()


def cmd_plot(args) -> None:
    from .plot import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out)}")


def cmd_bench(args) -> None:
    from .bench.runners import run

    try:
        factors = tuple(float(f) for f in args.lr_factors.split(","))
    except ValueError:
        factors = ()
    if not factors or not all(0 < f < math.inf for f in factors):
        raise ConfigError(f"--lr-factors {args.lr_factors!r}: expected positive numbers separated by commas")
    learn = dict(
        sizes=args.presets.split(","),
        data=args.data,
        steps=args.steps,
        seeds=args.seeds,
        plot=args.plot,
        overrides=tuple(args.set),
        recipe=tuple(args.recipe),
        factors=factors,
    )
    run(args.what, args.size, args.mode, args.baseline, args.repeats, args.json_out, learn, args.device)


def cmd_verify(args) -> None:
    from . import checkpoint
    from .data.shards import ShardError, verify_shards

    path = Path(args.path)
    if (path / "manifest.json").is_file():
        checked, problems = verify_shards(path)
        what = f"{checked} shards"
    elif (path / "checkpoints").is_dir():
        checked, problems = checkpoint.verify_run(path)
        what = f"{checked} checkpoints"
    else:
        raise ShardError(
            f"{path}: neither a prepared data directory (manifest.json) nor a run directory (checkpoints/)"
        )
    for problem in problems:
        print(problem)
    if problems:
        raise ShardError(f"{path}: {len(problems)} of {what} failed verification (listed above)")
    print(f"{path}: {what} verified")


def cmd_presets(args) -> None:
    from .configfile import keys_table, to_toml
    from .presets import train_config

    if args.name and "=" in args.name:  # `presets --config F key=value`: no name, an override
        args.name, args.overrides = None, [args.name, *args.overrides]
    if args.keys:
        print(keys_table())
    elif args.name or args.config:
        cfg = train_config(args.name, args.overrides, args.config)
        source = " ".join(["presets", *([args.name] if args.name else []), *args.overrides])
        source += f" --config {args.config}" if args.config else ""
        sys.stdout.write(cfg.to_json() + "\n" if args.format == "json" else to_toml(cfg, source))
    elif args.overrides:
        raise ConfigError("key=value overrides need a preset NAME or --config FILE to apply to")
    else:
        _list_presets()


def _list_presets() -> None:
    from .presets import train_config

    for name in TRAIN_PRESETS:
        c = train_config(name)
        m = c.model
        print(
            f"{name:16s} L{m.n_layer} d{m.n_embd} h{m.n_head} ctx{c.seq_len} batch {c.total_batch_size:,} tok "
            f"lr {c.max_lr:g} steps {c.max_steps:,} {c.optimizer}"
            + (f" (muon lr {c.muon_peak_lr:g})" if c.optimizer == "muon" else "")
            + (f", stops at val loss {c.target_val_loss:g}" if c.target_val_loss else "")
        )


COMMANDS = {
    "prepare": cmd_prepare,
    "train": cmd_train,
    "sample": cmd_sample,
    "chat": cmd_chat,
    "export": cmd_export,
    "eval": cmd_eval,
    "plot": cmd_plot,
    "bench": cmd_bench,
    "verify": cmd_verify,
    "presets": cmd_presets,
}


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come anywhere after `train` or `presets`, between options too
    if args.command in ("train", "presets") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except UserError as e:
        print(f"gpt2repro: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit code. A closed stdout (`| head`) is handled here, once: flushed
    inside, so it cannot fail later at exit, and no traceback."""
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush goes nowhere
        return SIGPIPE_EXIT
