"""The `gpt2repro` command line's arguments: the parser alone (a list of options, no logic), built
from the tables it offers so that names are written once. Imports no torch."""

from __future__ import annotations

import argparse

from . import __version__
from .bench.names import BASELINES, SIZES, TRAIN_MODES, WHAT
from .config.presets import TRAIN_PRESETS
from .config.schema import DTYPE_NAMES, WEIGHT_DTYPES
from .errors import UserError

HF_HELP = "Hugging Face GPT-2 directory, or hub model: gpt2 ... gpt2-xl, OWNER/NAME[@REVISION]"


def _add_model_source(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="run directory or checkpoint directory of ours")
    src.add_argument("--hf", help=HF_HELP)
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")


def _logit_bias(text: str) -> tuple[int, float]:
    token, sep, bias = text.partition("=")
    try:
        if sep:
            return int(token), float(bias)
    except ValueError:
        pass
    raise UserError(f"--logit-bias: expected TOKEN=BIAS (a token id and a number), got {text!r}")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    """The sampler's settings of sample and chat: the server's, with the same meaning (`Sampling`)."""
    p.add_argument("--top-k", type=int, default=50, help="0: no limit")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--presence-penalty", type=float, default=0.0, help="-2..2, taken from each token the reply has drawn"
    )
    p.add_argument(
        "--frequency-penalty", type=float, default=0.0, help="-2..2, times each token's count in the reply"
    )
    p.add_argument(
        "--logit-bias",
        nargs="+",
        action="extend",
        default=[],
        metavar="TOKEN=BIAS",
        help="added to these tokens' logits, as OpenAI's logit_bias (-100..100; -100 bans a token)",
    )


def sampling_settings(args: argparse.Namespace) -> dict:
    """The sampler's keywords from sample's or chat's arguments (as the Python API takes them)."""
    names = ("temperature", "top_k", "top_p", "seed", "presence_penalty", "frequency_penalty")
    return {**{n: getattr(args, n) for n in names}, "logit_bias": dict(map(_logit_bias, args.logit_bias))}


def _add_weight_dtype(p: argparse.ArgumentParser) -> None:
    """The decoding options of sample, chat and serve."""
    p.add_argument(
        "--weight-dtype",
        choices=WEIGHT_DTYPES,
        default="fp32",
        help="the weights themselves cast (faster decoding on GPUs and for batches), or int8: rounded per "
        "output feature and read as int8 (the fastest batch-1 decoding on a CPU)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile each one-token step whole: faster per token after compiling once per process "
        "(tens of seconds; the server compiles before it listens): int8 and bf16 on CPU "
        "(benchmarks/RESULTS.md)",
    )


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
        "datasets' save_to_disk, or local files/globs/directories (.parquet .jsonl[.gz] .json.gz .txt); "
        "'hf-shards:REPO' (or hf-shards:DIR): llm.c shards tokenized already, downloaded as they are",
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
        "--val-tokens",
        type=int,
        default=None,
        help="tokens in the val split (default: one shard; hf-shards: all)",
    )
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="tokenizer processes (default: the CPUs this process may use)",
    )
    p.add_argument(
        "--max-shards", type=int, default=None, help="hf-shards: train shards to fetch (default: all)"
    )
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
    p.add_argument("-n", type=int, default=4, help="samples; sample i is drawn with seed + i")
    p.add_argument("--max-new-tokens", type=int, default=32)
    _add_sampling(p)
    _add_weight_dtype(p)

    p = sub.add_parser(
        "chat", help="talk to a chat model (streamed replies, the conversation kept in the KV cache)"
    )
    _add_model_source(p)
    p.add_argument("--message", default=None, help="answer this once and exit (scripts)")
    p.add_argument("--system", default=None, help="a system message opening the conversation")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per reply at most")
    _add_sampling(p)
    _add_weight_dtype(p)

    p = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP API and a web chat page (needs the serve extra)"
    )
    _add_model_source(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: open)")
    p.add_argument(
        "--max-concurrency", type=int, default=8, help="sequences decoded together; more requests queue"
    )
    p.add_argument(
        "--max-tokens-limit", type=int, default=None, help="the largest max_tokens a request may ask"
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=None,
        help="a Host name to answer besides the bound address (repeatable; '*': any). Default: the bound "
        "address, with localhost names for a loopback one; any for 0.0.0.0",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=None,
        help="an origin (scheme://host:port) whose web pages may call the API (repeatable; default: none)",
    )
    p.add_argument(
        "--no-prefix-cache", action="store_true", help="re-run every prompt whole (no reuse of cached tokens)"
    )
    _add_weight_dtype(p)

    p = sub.add_parser(
        "export", help="export a model to a transformers directory, or to one GGUF file (llama.cpp, Ollama)"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="run directory or checkpoint directory of ours")
    src.add_argument("--hf", help=HF_HELP)
    p.add_argument("--out", required=True, help="the directory (hf) or the .gguf file (gguf) to write")
    p.add_argument("--format", choices=("hf", "gguf"), default="hf")
    p.add_argument(
        "--outtype",
        choices=("f32", "f16", "q8_0"),
        default=None,
        help="gguf: the matrices' type (default f32, lossless; vectors stay f32)",
    )

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

    h = ev.add_parser("core", help="the CORE metric (DCLM's 22 tasks, nanochat's scoring) of a base model")
    _add_model_source(h)
    h.add_argument(
        "--bundle",
        default=None,
        help="an eval bundle directory (core.yaml, eval_meta_data.csv, eval_data/); default: downloaded "
        "once into the cache",
    )
    h.add_argument("--tasks", default=None, help="comma-separated task labels (default: all of core.yaml)")
    h.add_argument(
        "--max-per-task", type=int, default=0, help="items per task, nanochat's seeded subsample (0: all)"
    )
    h.add_argument("--batch-size", type=int, default=16, help="items per forward pass")
    h.add_argument("--autocast-dtype", choices=DTYPE_NAMES, default="fp32")
    h.add_argument("--json", dest="json_out", default=None, help="write the results here")
    h.add_argument("--predictions", default=None, help="write per-item verdicts (jsonl) here")

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
