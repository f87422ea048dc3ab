"""Configuration dataclasses, named presets and validated `key=value` overrides.

Two configs: `GPTConfig` (the architecture, mirroring Hugging Face's GPT2Config fields) and
`TrainConfig` (one training run, with the model nested under `model`). Presets are plain functions of
nothing, so reading this file tells you exactly what each named run is.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A bad preset name, override key or value; the message is one line meant for the user."""


# Muon's LR over the preset's AdamW LR: the flat best of `bench learn` at cpu-tiny and cpu-demo
MUON_LR_RATIO = 4.0
MAX_BLOCK_SIZE = 1 << 17  # positions: far past any GPT-2/3 size, short of allocating gigabytes by typo
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
ACTIVATION_CHECKPOINTING = re.compile(r"none|full|every_[1-9]\d*")


def _check(key: str, value: Any, typ: type, ok: Callable[[Any], bool], expected: str) -> None:
    """Raise a one-line ConfigError unless `value` is a `typ` (bool is not an int here; an int is a
    float) and `ok(value)` (nan fails every comparison; ranges say whether inf is allowed)."""
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    right_type = (
        numeric and (typ is float or isinstance(value, int))
        if typ in (int, float)
        else isinstance(value, typ)
    )
    if not right_type or not ok(value):
        raise ConfigError(f"{key}={value!r}: expected {expected}")


@dataclass
class GPTConfig:
    block_size: int = 1024  # n_positions
    vocab_size: int = 50257  # real vocabulary: ids >= this are padding and never predicted
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_multiple: int = 1  # pad the embedding rows to a multiple of this (64 -> 50304) for speed
    layer_norm_epsilon: float = 1e-5

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple

    def validate(self) -> GPTConfig:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "vocab_multiple"):
            _check(f"model.{name}", getattr(self, name), int, lambda v: v > 0, "a positive integer")
        _check(
            "model.block_size",
            self.block_size,
            int,
            lambda v: v <= MAX_BLOCK_SIZE,
            f"at most {MAX_BLOCK_SIZE}",
        )
        _check(
            "model.vocab_size",
            self.vocab_size,
            int,
            lambda v: v <= 65536,
            "at most 65536 (shards store uint16 tokens)",
        )
        _check("model.layer_norm_epsilon", self.layer_norm_epsilon, float, lambda v: 0 < v < 1, "in (0, 1)")
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}")
        return self


# Architecture presets. GPT-3 sizes follow Table 2.1 of "Language Models are Few-Shot Learners".
MODEL_PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "gpt3-small": dict(n_layer=12, n_head=12, n_embd=768, block_size=2048),
    "gpt3-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=2048),
    "gpt3-large": dict(n_layer=24, n_head=16, n_embd=1536, block_size=2048),
    # Table 2.1 lists 24 heads for XL, but 2048 is not divisible by 24; its d_head=128 gives 16 heads.
    "gpt3-xl": dict(n_layer=24, n_head=16, n_embd=2048, block_size=2048),
    "gpt3-2.7b": dict(n_layer=32, n_head=32, n_embd=2560, block_size=2048),
    "gpt3-6.7b": dict(n_layer=32, n_head=32, n_embd=4096, block_size=2048),
    # Small sizes for CPU tests and the demo; same code, same vocabulary.
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=128),
    "cpu-tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),
    "cpu-demo": dict(n_layer=6, n_head=6, n_embd=192, block_size=256),
}


def model_config(name: str, **overrides: Any) -> GPTConfig:
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of: {', '.join(MODEL_PRESETS)}")
    return GPTConfig(**{**MODEL_PRESETS[name], **overrides}).validate()


@dataclass
class TrainConfig:
    model: GPTConfig = field(default_factory=GPTConfig)
    # batch: total_batch_size tokens per optimizer step = micro_batch_size * seq_len * world * grad_accum
    total_batch_size: int = 524288
    micro_batch_size: int = 64
    seq_len: int = 1024
    # optimisation: adamw (the original) | muon (Muon on the blocks' matrices, AdamW on the rest)
    optimizer: str = "adamw"
    muon_lr: float = 0.0  # Muon's peak LR, on AdamW's scale; 0 = the recipe: MUON_LR_RATIO * max_lr
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.1
    muon_ns_dtype: str = "auto"  # Newton-Schulz dtype: auto (bf16 where native, else fp32) | bf16 | fp32
    muon_split_qkv: bool = True  # orthogonalise c_attn's Q, K, V blocks apart (else as one 3d x d matrix)
    schedule: str = "cosine"  # cosine (to min_lr_ratio) | wsd (warmup, stable, linear decay)
    wsd_decay_fraction: float = 0.2  # wsd: the last fraction of max_steps decays
    target_val_loss: float = 0.0  # > 0: stop when validation loss reaches it (tokens and time logged)
    max_steps: int = 19073
    warmup_steps: int = 715
    max_lr: float = 6e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    # start from pretrained weights (a hub name, an HF GPT-2 directory or a run of ours); the
    # architecture then comes from the weights (model.vocab_multiple excepted)
    init_from: str = ""
    # data
    shuffle: bool = False  # reshuffle shards and windows every epoch (the original did not)
    verify_data: bool = False  # check the shards' sha256s (manifest.json) at start, shared over ranks
    seed: int = 1337
    # evaluation and sampling (0 disables)
    val_every: int = 250
    val_steps: int = 20
    hellaswag_every: int = 250
    hellaswag_limit: int = 0  # 0 = all 10,042 examples
    hellaswag_style: str = "completion"
    sample_every: int = 250
    sample_prompt: str = "Hello, I'm a language model,"
    sample_count: int = 4
    sample_tokens: int = 32
    # checkpoints
    ckpt_every: int = 5000
    keep_last: int = 3
    resume: str = "auto"  # auto: continue from RUN_DIR's latest checkpoint if any | never | require
    overwrite: bool = False  # a fresh run (resume=never) may delete an earlier run's checkpoints
    time_limit: float = 0.0  # seconds; >0 stops (with a checkpoint) when the budget is spent
    # systems
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast dtype for forward/backward)
    compile: str = "auto"  # auto (on for CUDA) | true | false
    fsdp: bool = False
    activation_checkpointing: str = "none"  # none | full | every_N (every N-th block): memory for compute
    log_every: int = 1
    tensorboard: bool = False
    wandb: bool = False

    def validate(self) -> TrainConfig:
        """Every value range, checked once, so the CLI and the Python API refuse the same things."""
        self.model.validate()
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if not isinstance(self.device, str) or not DEVICE.fullmatch(self.device):
            raise ConfigError(f"device={self.device!r}: expected auto, cpu, cuda, cuda:N or mps")
        for key, (typ, ok, expected) in RANGES.items():
            _check(key, getattr(self, key), typ, ok, expected)
        if not ACTIVATION_CHECKPOINTING.fullmatch(self.activation_checkpointing):
            raise ConfigError(
                f"activation_checkpointing={self.activation_checkpointing!r}: expected none, full or every_N (N >= 1)"
            )
        if self.seq_len > self.model.block_size:
            raise ConfigError(f"seq_len={self.seq_len} exceeds model.block_size={self.model.block_size}")
        if self.optimizer == "muon" and self.fsdp:
            raise ConfigError(
                "optimizer=muon with fsdp=true is not supported: Newton-Schulz needs whole matrices, FSDP shards them"
            )
        if self.dtype == "fp16" and self.fsdp:
            raise ConfigError(
                "dtype=fp16 with fsdp=true is not supported: the gradient scaler would see only this rank's "
                "shard of the gradients; use bf16 (or fp32)"
            )
        if self.target_val_loss and not self.val_every:
            raise ConfigError("target_val_loss needs validation: set val_every > 0")
        if self.val_every and not self.val_steps:
            raise ConfigError(
                "val_steps=0 with val_every>0 would report a loss of nothing; set val_every=0 instead"
            )
        if self.sample_every and not (self.sample_count and self.sample_tokens and self.sample_prompt):
            raise ConfigError(
                "sampling needs sample_count>0, sample_tokens>0 and a non-empty sample_prompt (or sample_every=0)"
            )
        return self

    @property
    def muon_peak_lr(self) -> float:
        """muon_lr, or the recipe's: the preset's AdamW LR (set per width, as GPT-3's table does)
        times a ratio measured by `gpt2repro bench learn` (benchmarks/RESULTS.md)."""
        return self.muon_lr or MUON_LR_RATIO * self.max_lr

    @property
    def checkpoint_every(self) -> int:
        return checkpoint_interval(self.activation_checkpointing)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        model = GPTConfig(**d.pop("model"))
        return cls(model=model, **d).validate()

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def checkpoint_interval(mode: str) -> int:
    """activation_checkpointing as a block interval: 0 (none), 1 (full), N (every_N)."""
    named = {"none": 0, "full": 1}
    return named[mode] if mode in named else int(mode.removeprefix("every_"))


POSITIVE = (int, lambda v: v > 0, "a positive integer")
COUNT = (int, lambda v: v >= 0, "an integer >= 0 (0 disables)")
CHOICES = {
    "dtype": ("auto", "fp32", "bf16", "fp16"),
    "compile": ("auto", "true", "false"),
    "resume": ("auto", "never", "require"),
    "hellaswag_style": ("completion", "harness"),
    "optimizer": ("adamw", "muon"),
    "schedule": ("cosine", "wsd"),
    "muon_ns_dtype": ("auto", "bf16", "fp32"),
}
RANGES: dict[str, tuple[type, Callable[[Any], bool], str]] = {
    "total_batch_size": POSITIVE,
    "micro_batch_size": POSITIVE,
    "seq_len": POSITIVE,
    "max_steps": POSITIVE,
    "keep_last": POSITIVE,
    "warmup_steps": (int, lambda v: v >= 0, "an integer >= 0"),
    "max_lr": (float, lambda v: 0 < v < math.inf, "a positive number"),
    "min_lr_ratio": (float, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "muon_lr": (float, lambda v: 0 <= v < math.inf, "a number >= 0 (0 = the recipe's)"),
    "muon_momentum": (float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "muon_weight_decay": (float, lambda v: 0 <= v < math.inf, "a number >= 0"),
    "wsd_decay_fraction": (float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "target_val_loss": (float, lambda v: 0 <= v < math.inf, "a loss >= 0 (0 = none)"),
    "weight_decay": (float, lambda v: 0 <= v < math.inf, "a number >= 0"),
    "beta1": (float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "beta2": (float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "eps": (float, lambda v: 0 < v < math.inf, "a positive number"),
    "grad_clip": (float, lambda v: v > 0, "a positive number (inf disables clipping)"),
    "seed": (int, lambda v: 0 <= v < 2**63, "an integer in [0, 2^63)"),
    "val_every": COUNT,
    "val_steps": (int, lambda v: v >= 0, "an integer >= 0"),
    "hellaswag_every": COUNT,
    "hellaswag_limit": (int, lambda v: v >= 0, "an integer >= 0 (0 = all examples)"),
    "sample_every": COUNT,
    "sample_prompt": (str, lambda v: True, "a string"),
    "sample_count": (int, lambda v: v >= 0, "an integer >= 0"),
    "sample_tokens": (int, lambda v: v >= 0, "an integer >= 0"),
    "ckpt_every": COUNT,
    "time_limit": (float, lambda v: 0 <= v < math.inf, "seconds >= 0 (0 = no limit)"),
    "log_every": COUNT,
}


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


def _gpt2_124m_muon() -> TrainConfig:
    """The 124M run with the Muon recipe in half the original's tokens (5B): `bench learn` measured
    at most 0.5x the tokens to AdamW's loss at two CPU sizes (README: why half, not the ratio)."""
    return dataclasses.replace(_gpt2_124m_10b(), optimizer="muon", max_steps=math.ceil(19073 / 2))


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
        compile="false",
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
    "cpu-tiny": lambda: _cpu("cpu-tiny", micro=8, seq=128, accum=2, steps=60, lr=3e-3),
    "cpu-demo": lambda: _cpu("cpu-demo", micro=8, seq=256, accum=2, steps=400, lr=2e-3),
    # the recipe on CPU: in make demo's time, the val loss AdamW needs twice the steps for (README)
    "cpu-demo-muon": lambda: dataclasses.replace(
        _cpu("cpu-demo", micro=8, seq=256, accum=2, steps=100, lr=2e-3), optimizer="muon"
    ),
}


def _coerce(key: str, raw: str, current: Any) -> Any:
    """The override's text as the type of the field's current value."""
    if isinstance(current, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={raw!r}: expected true or false")
    try:
        if isinstance(current, int):  # 1e6 is accepted for an integer, 1.5 is not
            value = float(raw) if "e" in raw.lower() and "." not in raw else int(raw)
            if not float(value).is_integer():
                raise ValueError
            return int(value)
        if isinstance(current, float):
            return float(raw)
    except (ValueError, OverflowError):
        typ = "int" if isinstance(current, int) else "float"
        raise ConfigError(f"{key}={raw!r}: expected {typ}") from None
    return raw


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply `key=value` strings (`model.n_layer=4` for the architecture) and re-validate."""
    train_keys = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "model"]
    model_keys = [f.name for f in dataclasses.fields(GPTConfig)]
    valid = ", ".join(train_keys + [f"model.{k}" for k in model_keys])
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        target, name, names = (
            (cfg.model, key[6:], model_keys) if key.startswith("model.") else (cfg, key, train_keys)
        )
        if name not in names:  # fields only: not methods, properties or `model` itself
            raise ConfigError(f"unknown config key {key!r}; valid keys: {valid}")
        setattr(target, name, _coerce(key, raw, getattr(target, name)))
    return cfg.validate()


def train_config(preset: str, overrides: list[str] | None = None) -> TrainConfig:
    if preset not in TRAIN_PRESETS:
        raise ConfigError(f"unknown training preset {preset!r}; choose one of: {', '.join(TRAIN_PRESETS)}")
    cfg, overrides = TRAIN_PRESETS[preset](), overrides or []
    init_from = next(
        (o.split("=", 1)[1] for o in overrides if o.strip().startswith("init_from=")), cfg.init_from
    )
    architecture = [o.split("=")[0].strip() for o in overrides if o.strip().startswith("model.")]
    conflicts = [k for k in architecture if k != "model.vocab_multiple"]
    if init_from and conflicts:
        raise ConfigError(
            f"{conflicts[0]} cannot be set with init_from={init_from}: the architecture comes from the "
            "weights (only model.vocab_multiple may be)"
        )
    cfg = apply_overrides(cfg, overrides)
    return cfg
