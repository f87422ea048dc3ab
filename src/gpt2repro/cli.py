"""The `gpt2repro` command: prepare, train, eval, sample, chat, serve, export, plot, bench, presets.

Every known kind of bad input ends in one line on stderr, `gpt2repro: error: ...`, and exit code 2.
Output piped into a reader that stops early (`| head`) ends quietly. Everything that needs torch
is imported by the command that uses it, so `--help`, `--version` and `presets` start at once."""

from __future__ import annotations

import math
import os
import select
import sys
from pathlib import Path

from .cliargs import build_parser, sampling_settings
from .config.presets import TRAIN_PRESETS
from .config.schema import RANGES, ConfigError
from .errors import UserError

SIGPIPE_EXIT = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader went away


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll says POLLERR), as after `| head`."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, ValueError, OSError):  # no poll (Windows), or stdout is no file
        return False


def _load(args, device):
    from .api import read_model

    return read_model(args.checkpoint or args.hf, device, "checkpoint" if args.checkpoint else "hf")


def _load_for_decoding(args, device):
    """The model in `--weight-dtype`, prepared for decoding on this host: `gpt2repro.load`."""
    from .api import load

    source, kind = (args.checkpoint, "checkpoint") if args.checkpoint else (args.hf, "hf")
    return load(source, device=str(device), weight_dtype=args.weight_dtype, kind=kind, compiled=args.compile)


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
        max_shards=args.max_shards,
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
        f"no reply {c['no_reply']:,}, bad {c['bad']:,}"
    )


def cmd_train(args) -> None:
    from .config.presets import train_config

    overrides = args.overrides + (["resume=require"] if args.resume else [])
    cfg = train_config(args.preset, overrides, args.config)
    if cfg.model.chat:  # conversations, the masked loss
        from .training.sft import train
    else:
        from .training.train import train
    train(cfg, args.data, args.out)


def cmd_sample(args) -> None:
    from .parallel.distributed import pick_device

    sampling = _sampling(args)
    llm = _load_for_decoding(args, pick_device(args.device))
    for text in llm.samples(args.prompt, args.n, max_new_tokens=args.max_new_tokens, **sampling):
        print(f"> {text}")


def _sampling(args) -> dict:
    """sample's or chat's sampler settings, checked before a model is loaded (but for logit_bias's
    token ids, which the model's vocabulary bounds)."""
    from .generation.sampling import Sampling

    settings = sampling_settings(args)
    Sampling.make(**settings).check()
    return settings


def cmd_chat(args) -> None:
    from .generation.chat_cli import run
    from .parallel.distributed import pick_device

    sampling = _sampling(args)
    model = _load_for_decoding(args, pick_device(args.device)).model
    run(
        model,
        args.message,
        args.system,
        max_new_tokens=args.max_new_tokens,
        compiled=args.compile,
        **sampling,
    )


def cmd_serve(args) -> None:
    if args.max_concurrency < 1 or not 0 <= args.port < 65536:
        raise UserError("--max-concurrency must be at least 1 and --port between 0 (any free one) and 65535")
    if args.max_tokens_limit is not None and args.max_tokens_limit < 1:
        raise UserError("--max-tokens-limit must be at least 1")
    from .parallel.distributed import pick_device
    from .serve.run import model_name, serve, served_model, uvicorn_module

    uvicorn_module()  # the missing extra named before the model loads
    model = _load_for_decoding(args, pick_device(args.device)).model
    served = served_model(
        model,
        model_name(args.checkpoint, args.hf),
        args.max_concurrency,
        not args.no_prefix_cache,
        args.compile,
    )
    if args.api_key is None:
        print("gpt2repro serve: no --api-key: anyone who can reach the port can use it", file=sys.stderr)
    serve(
        served, args.host, args.port, args.api_key, args.max_tokens_limit, args.allowed_host, args.cors_origin
    )


def cmd_export(args) -> None:
    source, hf = (args.hf, True) if args.hf else (args.checkpoint, False)
    if args.format == "gguf":
        from .interop.gguf_export import export_gguf_source

        out = export_gguf_source(source, args.out, args.outtype or "f32", hf=hf)
        print(f"exported to {out} (llama.cpp: llama-cli -m {out}; Ollama: FROM {out} in a Modelfile)")
        return
    if args.outtype is not None:
        raise UserError("--outtype applies to --format gguf only")
    from .interop.hf import export_checkpoint

    out = export_checkpoint(source, args.out, hf=hf)
    print(f"exported to {out} (load with transformers.GPT2LMHeadModel.from_pretrained)")


def cmd_eval(args) -> None:
    from .evals import report
    from .parallel.distributed import setup, teardown
    from .training.heap import reuse_freed_memory

    info = setup(args.device)
    try:
        report.check_output_paths(args.json_out, getattr(args, "predictions", None))
        reuse_freed_memory(info.device)  # each batch's logits: no fresh pages each time (training/heap.py)
        bundle = _core_bundle(args) if args.task == "core" else None  # its errors before the model loads
        model = _load(args, info.device)
        if bundle is not None:
            report.run_core(
                model, bundle, info, args.batch_size, args.autocast_dtype, args.json_out, args.predictions
            )
            return
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


def _core_bundle(args):
    from .evals.core_data import CoreError, load_bundle

    if args.batch_size < 1:
        raise CoreError(f"--batch-size must be at least 1, got {args.batch_size}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    return load_bundle(args.bundle, tasks, args.max_per_task)


def cmd_plot(args) -> None:
    from .training.plot import plot_run

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
    from .checkpoint import ckptdir
    from .data.shards import ShardError, verify_shards

    path = Path(args.path)
    run = path.parent if path.name == "checkpoints" else path
    if ckptdir.is_checkpoint(path):  # RUN/checkpoints/step_N: it holds a manifest.json too
        checked, problems = ckptdir.verify_each([path])
        what, error = "1 checkpoint", ckptdir.CheckpointError
    elif (path / "manifest.json").is_file():
        checked, problems = verify_shards(path)
        what, error = f"{checked} shards", ShardError
    elif (run / "checkpoints").is_dir():
        checked, problems = ckptdir.verify_run(run)
        what, error = f"{checked} checkpoints", ckptdir.CheckpointError
    else:
        raise UserError(
            f"{path}: neither a prepared data directory (manifest.json), a run directory (checkpoints/) "
            "nor a checkpoint (model.safetensors or shards)"
        )
    if not checked:  # nothing verified is no pass
        raise error(f"{path}: nothing to verify ({what} found)")
    for problem in problems:
        print(problem)
    if problems:
        raise error(f"{path}: {len(problems)} of {what} failed verification (listed above)")
    print(f"{path}: {what} verified")


def cmd_presets(args) -> None:
    from .config.configfile import keys_table, to_toml
    from .config.presets import train_config

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
    from .config.presets import train_config

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
    "serve": cmd_serve,
    "export": cmd_export,
    "eval": cmd_eval,
    "plot": cmd_plot,
    "bench": cmd_bench,
    "verify": cmd_verify,
    "presets": cmd_presets,
}


def _check_seed(args) -> None:
    """A --seed in the range of the seed key, for every command that takes one (torch refuses
    others only once a model is loaded)."""
    _, ok, expected = RANGES["seed"]
    if getattr(args, "seed", None) is not None and not ok(args.seed):
        raise ConfigError(f"--seed {args.seed}: expected {expected}")


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come anywhere after `train` or `presets`, between options too
    if args.command in ("train", "presets") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        _check_seed(args)
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except UserError as e:
        # one write: with unbuffered stderr, print() writes the newline apart, and ranks sharing
        # a terminal or pipe would run their lines together
        sys.stderr.write(f"gpt2repro: error: {e}\n")
        sys.stderr.flush()
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
