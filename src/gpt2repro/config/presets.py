"""Named runs and how a run's configuration is resolved: a preset, then a config file, then
`key=value` overrides, each later one winning, validated once.

Presets are plain functions of nothing, so reading this file tells you exactly what each named run
is; `configs/` holds the ones users start from, written by `gpt2repro presets NAME` (a test keeps
them equal)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..files.jsonio import shown
from .configfile import read_config_file
from .overrides import apply_overrides, set_value
from .schema import ConfigError, TrainConfig, model_config


def _gpt3(size: str, lr: float, batch: int) -> TrainConfig:
    """GPT-3 paper recipe: n_ctx 2048, warmup over 375M tokens, cosine to 10%, ~10B tokens here."""
    steps = 10_000_000_000 // batch
    return TrainConfig(
        model=model_config(size, vocab_multiple=64),
        total_batch_size=batch,
        micro_batch_size=16,
        seq_len=2048,
        max_lr=lr,
        warmup_steps=math.ceil(375_000_000 / batch),
        max_steps=steps,
        shuffle=True,
        dtype="bf16",
        fsdp=size in ("gpt3-xl", "gpt3-2.7b", "gpt3-6.7b"),
        activation_checkpointing="full" if size in ("gpt3-xl", "gpt3-2.7b", "gpt3-6.7b") else "none",
    )


def _gpt2_124m_10b() -> TrainConfig:
    return TrainConfig(model=model_config("gpt2", vocab_multiple=64), dtype="bf16")


def _gpt2_124m_40b() -> TrainConfig:
    return dataclasses.replace(_gpt2_124m_10b(), max_steps=76292, shuffle=True)


# GPT-2 124M's val loss on FineWeb-EDU (README's reference numbers): the Muon run stops once reached
GPT2_124M_VAL_LOSS = 3.29
# tokens Muon needs at 124M against tuned AdamW, from published runs (~1.4-1.5x the efficiency):
# modded-nanogpt (records 2 -> 4: 9,536 -> 6,200 steps) and arXiv 2509.02046 (~1.4x at 0.1B)
MUON_TOKEN_SHARE_124M = 0.7


def _gpt2_124m_muon() -> TrainConfig:
    """The 124M run with the Muon recipe: at most 0.7x the original's steps, the share the published
    124M comparisons support (not the 0.33-0.39x our CPU sweeps measured over their first 123k
    tokens), stopping early once GPT-2 124M's validation loss is reached."""
    return dataclasses.replace(
        _gpt2_124m_10b(),
        optimizer="muon",
        max_steps=math.ceil(19073 * MUON_TOKEN_SHARE_124M),
        target_val_loss=GPT2_124M_VAL_LOSS,
    )


def _cpu(model: str, micro: int, seq: int, accum: int, steps: int, lr: float) -> TrainConfig:
    return TrainConfig(
        model=model_config(model, vocab_multiple=64),
        total_batch_size=micro * seq * accum,
        micro_batch_size=micro,
        seq_len=seq,
        max_steps=steps,
        warmup_steps=max(1, steps // 20),
        max_lr=lr,
        shuffle=True,
        val_every=max(1, steps // 10),
        val_steps=4,
        hellaswag_every=max(1, steps // 2),
        hellaswag_limit=200,
        sample_every=max(1, steps // 2),
        sample_tokens=24,
        sample_count=2,
        ckpt_every=max(1, steps // 4),
        dtype="auto",  # bf16 where the CPU has native bf16 matmuls, else fp32
        compile=False,
    )


def _finetune() -> TrainConfig:
    """nanoGPT's Shakespeare fine-tune, generalised: pretrained GPT-2 (the architecture comes from
    the weights), 32k-token batches, a short warmup to a small LR, no HellaSwag."""
    return TrainConfig(
        model=model_config("gpt2", vocab_multiple=64),
        init_from="gpt2",
        total_batch_size=32768,
        micro_batch_size=8,
        seq_len=1024,
        max_steps=200,
        warmup_steps=10,
        max_lr=3e-5,
        shuffle=True,
        val_every=25,
        val_steps=10,
        hellaswag_every=0,
        sample_every=50,
        ckpt_every=50,
    )


def _sft() -> TrainConfig:
    """Supervised fine-tuning on conversations (`prepare --chat`): a pretrained GPT-2 gains the chat
    tokens and learns the assistant's turns. A larger LR than `finetune` (the chat tokens start from
    nothing), validation on held-out conversations, samples that answer prompts; not tuned."""
    return dataclasses.replace(
        _finetune(),
        model=model_config("gpt2", vocab_multiple=64).as_chat(),
        max_steps=300,
        warmup_steps=10,
        max_lr=1e-4,
        val_every=50,
        sample_every=100,
        sample_prompt="Hello! Who are you?",
        sample_count=2,
        sample_tokens=48,
        ckpt_every=100,
    )


TRAIN_PRESETS = {
    "gpt2-124m-10B": _gpt2_124m_10b,
    "gpt2-124m-40B": _gpt2_124m_40b,
    "gpt2-124m-muon": _gpt2_124m_muon,
    "gpt3-small": lambda: _gpt3("gpt3-small", 6.0e-4, 524288),
    "gpt3-medium": lambda: _gpt3("gpt3-medium", 3.0e-4, 524288),
    "gpt3-large": lambda: _gpt3("gpt3-large", 2.5e-4, 524288),
    "gpt3-xl": lambda: _gpt3("gpt3-xl", 2.0e-4, 1048576),
    "gpt3-2.7b": lambda: _gpt3("gpt3-2.7b", 1.6e-4, 1048576),
    "finetune": _finetune,
    "sft": _sft,
    "cpu-tiny": lambda: _cpu("cpu-tiny", micro=8, seq=128, accum=2, steps=60, lr=3e-3),
    "cpu-demo": lambda: _cpu("cpu-demo", micro=8, seq=256, accum=2, steps=400, lr=2e-3),
    # the recipe on CPU: in make demo's time, the val loss AdamW needs twice the steps for (README)
    "cpu-demo-muon": lambda: dataclasses.replace(
        _cpu("cpu-demo", micro=8, seq=256, accum=2, steps=100, lr=2e-3), optimizer="muon"
    ),
}


def _refuse_architecture_with_init_from(cfg: TrainConfig, overrides: list[str]) -> None:
    """With init_from the architecture is the weights': a `model.*` override would be ignored, so
    it is refused (a file's [model] keys are a record of it, as a run's config.json holds)."""
    init_from = next(
        (o.split("=", 1)[1] for o in overrides if o.strip().startswith("init_from=")), cfg.init_from
    )
    architecture = [o.split("=")[0].strip() for o in overrides if o.strip().startswith("model.")]
    conflicts = [k for k in architecture if k not in ("model.vocab_multiple", "model.chat")]
    if init_from and conflicts:
        raise ConfigError(
            f"{conflicts[0]} cannot be set with init_from={init_from}: the architecture comes from the "
            "weights (only model.vocab_multiple and model.chat may be)"
        )


def preset_config(name: str) -> TrainConfig:
    if name not in TRAIN_PRESETS:
        raise ConfigError(f"unknown training preset {name!r}; choose one of: {', '.join(TRAIN_PRESETS)}")
    return TRAIN_PRESETS[name]()


def _base(preset: str | None, named: Any, where: Callable[[str], str]) -> TrainConfig:
    """The preset named by the caller or by the file (not two different ones), else the defaults."""
    if named is not None and not isinstance(named, str):
        raise ConfigError(
            f"{where('preset')}: preset={shown(named)}: expected a preset name (a string)", "preset"
        )
    if named is not None and preset not in (None, named):
        raise ConfigError(
            f"{where('preset')}: preset={shown(named)} but the preset given is {preset!r}; name it once",
            "preset",
        )
    name = preset if preset is not None else named
    if name is None:
        return TrainConfig()
    try:
        return preset_config(name)
    except ConfigError as e:
        raise ConfigError(f"{where('preset')}: {e}" if named else str(e), "preset") from None


def train_config(
    preset: str | None = None, overrides: list[str] | None = None, file: str | Path | None = None
) -> TrainConfig:
    """The preset's config, then the file's keys (TOML or JSON; it may name the preset itself),
    then the `key=value` overrides. An error about a key the file set says where in the file."""
    if preset is None and file is None:
        raise ConfigError("a run needs a preset or a config file")
    values, where = read_config_file(file) if file is not None else ({}, str)
    cfg = _base(preset, values.pop("preset", None), where)
    for key, value in values.items():
        try:
            set_value(cfg, key, value)
        except ConfigError as e:
            raise ConfigError(f"{where(key)}: {e}", key) from None
    overrides = overrides or []
    _refuse_architecture_with_init_from(cfg, overrides)
    try:
        return apply_overrides(cfg, overrides)
    except ConfigError as e:  # a bad value the file set, and no override replaced
        if e.key in values and e.key not in {o.split("=", 1)[0].strip() for o in overrides}:
            raise ConfigError(f"{where(e.key)}: {e}", e.key) from None
        raise
