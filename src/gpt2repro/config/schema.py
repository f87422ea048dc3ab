"""Configuration dataclasses, their validation, and setting their keys from `key=value` text or
from the typed values of a file.

Two configs: `GPTConfig` (the architecture, mirroring Hugging Face's GPT2Config fields) and
`TrainConfig` (one training run, with the model nested under `model`). Every field carries its
one-line meaning (`field(metadata={"help": ...})`): `gpt2repro presets --keys`, the comments of the
files `presets NAME` writes and docs/config.md all read it from here. Named runs are in presets.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import UserError
from ..files.jsonio import shown


class ConfigError(UserError, ValueError):
    """A bad preset name, override key or value; the message is one line meant for the user.
    `key` names the config key at fault, when there is one (so a file can say on which line)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


# Muon's LR over the preset's AdamW LR: the flat best of `bench learn` at cpu-tiny and cpu-demo
MUON_LR_RATIO = 4.0
GPT2_VOCAB_SIZE = 50257  # GPT-2's BPE: 50,256 merges and <|endoftext|>
CHAT_VOCAB_SIZE = 50263  # and the 6 chat tokens after it (chat.py), in rows the padding already holds
MAX_BLOCK_SIZE = 1 << 17  # positions: far past any GPT-2/3 size, short of allocating gigabytes by typo
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DTYPE_NAMES = ("fp32", "bf16", "fp16")  # precision.DTYPES maps them to torch dtypes (tested equal)
WEIGHT_DTYPES = (*DTYPE_NAMES, "int8")  # decoding: int8 weights too (generation/int8.py)
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
        raise ConfigError(f"{key}={shown(value)}: expected {expected}", key)


def _key(default: Any, help: str) -> Any:
    """A config field with its default and its one-line meaning."""
    return field(default=default, metadata={"help": help})


@dataclass
class GPTConfig:
    block_size: int = _key(1024, "positions (HF n_positions): the longest sequence the model reads")
    vocab_size: int = _key(50257, "the real vocabulary: ids >= this are padding, never predicted")
    n_layer: int = _key(12, "transformer blocks")
    n_head: int = _key(12, "attention heads (must divide n_embd)")
    n_embd: int = _key(768, "width (d_model)")
    vocab_multiple: int = _key(
        1, "pad the embedding rows to a multiple of this for speed (64: 50257 -> 50304)"
    )
    layer_norm_epsilon: float = _key(1e-5, "LayerNorm epsilon")
    chat: bool = _key(
        False,
        f"a chat model: the vocabulary ends with the chat tokens (vocab_size {CHAT_VOCAB_SIZE}: GPT-2's "
        f"{GPT2_VOCAB_SIZE} + {CHAT_VOCAB_SIZE - GPT2_VOCAB_SIZE})",
    )

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple

    def as_chat(self) -> GPTConfig:
        """This architecture with the chat tokens: GPT-2's vocabulary extended by them."""
        if self.vocab_size not in (GPT2_VOCAB_SIZE, CHAT_VOCAB_SIZE):
            raise ConfigError(
                f"model.vocab_size={self.vocab_size}: the chat tokens extend GPT-2's vocabulary of "
                f"{GPT2_VOCAB_SIZE}",
                "model.chat",
            )
        return dataclasses.replace(self, chat=True, vocab_size=CHAT_VOCAB_SIZE).validate()

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
        _check("model.chat", self.chat, bool, lambda v: True, "true or false")
        if self.chat and self.vocab_size != CHAT_VOCAB_SIZE:
            raise ConfigError(
                f"model.chat=true needs model.vocab_size={CHAT_VOCAB_SIZE} (GPT-2's {GPT2_VOCAB_SIZE} and the "
                f"chat tokens), got {self.vocab_size}",
                "model.vocab_size",
            )
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}", "model.n_head"
            )
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
    model: GPTConfig = field(default_factory=GPTConfig, metadata={"help": "the architecture"})
    # batch
    total_batch_size: int = _key(
        524288, "tokens per optimizer step = micro_batch_size x seq_len x ranks x grad accumulation"
    )
    micro_batch_size: int = _key(64, "sequences per forward pass on each rank")
    seq_len: int = _key(1024, "tokens per training sequence (at most model.block_size)")
    # optimisation
    optimizer: str = _key(
        "adamw", "adamw (the original) or muon (Muon on the blocks' matrices, AdamW on the rest)"
    )
    muon_lr: float = _key(
        0.0,
        f"Muon's peak LR, on AdamW's scale; 0 = the recipe, {MUON_LR_RATIO:g} x max_lr "
        "(which follows width as GPT-3's table does)",
    )
    muon_momentum: float = _key(0.95, "Muon's Nesterov momentum")
    muon_weight_decay: float = _key(0.1, "decoupled weight decay of the Muon matrices")
    muon_ns_dtype: str = _key(
        "auto", "Newton-Schulz dtype; auto: bf16 where matmuls are native (GPUs, AVX-512-BF16/AMX), else fp32"
    )
    muon_split_qkv: bool = _key(
        True, "orthogonalise c_attn's Q, K, V blocks apart (false: as one 3d x d matrix)"
    )
    schedule: str = _key(
        "cosine", "cosine (the original) or wsd: warmup, stable, linear decay over wsd_decay_fraction"
    )
    wsd_decay_fraction: float = _key(0.2, "wsd: the last fraction of max_steps, where the LR decays")
    target_val_loss: float = _key(
        0.0, "> 0: stop when validation loss reaches it, logging the tokens and seconds it took"
    )
    max_steps: int = _key(19073, "optimizer steps")
    warmup_steps: int = _key(715, "steps of linear LR warmup")
    max_lr: float = _key(6e-4, "peak (AdamW) learning rate")
    min_lr_ratio: float = _key(0.1, "the final LR, as a fraction of max_lr")
    weight_decay: float = _key(0.1, "AdamW's decoupled weight decay, on the >= 2-D parameters only")
    beta1: float = _key(0.9, "AdamW's beta1")
    beta2: float = _key(0.95, "AdamW's beta2")
    eps: float = _key(1e-8, "AdamW's epsilon")
    grad_clip: float = _key(1.0, "clip the global gradient norm to this (inf: no clipping)")
    init_from: str = _key(
        "",
        "pretrained weights to start from: a hub name, an HF GPT-2 directory or a run of ours "
        "(the architecture is then theirs)",
    )
    # data
    shuffle: bool = _key(False, "reshuffle shards and windows every epoch (the original did not)")
    verify_data: bool = _key(False, "check the shards' sha256s against manifest.json at start")
    seed: int = _key(1337, "seed of the initial weights and of the data order")
    # evaluation and sampling (0 disables)
    val_every: int = _key(250, "validation loss every N steps (0: never)")
    val_steps: int = _key(20, "micro-batches per validation")
    hellaswag_every: int = _key(250, "HellaSwag every N steps (0: never)")
    hellaswag_limit: int = _key(0, "HellaSwag examples scored in the loop (0: all 10,042)")
    hellaswag_style: str = _key(
        "completion", "completion (build-nanogpt's scoring) or harness (lm-evaluation-harness's)"
    )
    core_every: int = _key(0, "the CORE metric every N steps (0: never; needs the eval bundle)")
    core_max_per_task: int = _key(
        500, "CORE items per task in the loop, nanochat's seeded subsample (0: all ~91k, not cheap)"
    )
    core_bundle: str = _key("", "the CORE eval bundle directory ('': downloaded once into the cache)")
    target_core: float = _key(
        0.0,
        "> 0: stop when CORE reaches it (GPT-2 1.5B: 0.2565), logging the training time to it "
        "(evaluation excluded)",
    )
    sample_every: int = _key(250, "samples every N steps (0: never)")
    sample_prompt: str = _key("Hello, I'm a language model,", "the prompt of the in-loop samples")
    sample_count: int = _key(4, "samples per sampling")
    sample_tokens: int = _key(32, "new tokens per sample")
    # checkpoints
    ckpt_every: int = _key(5000, "checkpoint every N steps (0: only at the end)")
    keep_last: int = _key(3, "checkpoints kept; older ones are deleted")
    resume: str = _key(
        "auto", "auto: continue from the run directory's latest checkpoint if any; never; require"
    )
    overwrite: bool = _key(False, "a fresh run (resume=never) may delete an earlier run's checkpoints")
    time_limit: float = _key(0.0, "seconds; > 0 stops with a checkpoint once spent (0: no limit)")
    schedule_clock: str = _key(
        "steps",
        "steps, or time: schedule progress = max(step / max_steps, training seconds / time_budget)",
    )
    time_budget: float = _key(
        0.0, "schedule_clock=time: training seconds (evaluation and checkpoints excluded) the schedule spans"
    )
    # systems
    device: str = _key("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    dtype: str = _key(
        "auto", "autocast dtype of forward/backward; auto: bf16 where native (fp16 on older GPUs), else fp32"
    )
    compile: bool = _key(True, "torch.compile the model (off in the CPU presets: short runs do not repay it)")
    fsdp: bool = _key(
        False, "under torchrun, FSDP2 instead of DDP: built on meta, sharded per block, sharded checkpoints"
    )
    activation_checkpointing: str = _key(
        "none", "recompute blocks in backward: none, full or every_N (every N-th block): memory for compute"
    )
    log_every: int = _key(1, "a console line every N steps (0: none; metrics.jsonl gets every step)")
    tensorboard: bool = _key(False, "also log to TensorBoard (RUN/tb; needs the tensorboard package)")
    wandb: bool = _key(False, "also log to Weights & Biases (needs the wandb package)")

    def validate(self) -> TrainConfig:
        """Every value range, checked once, so the CLI and the Python API refuse the same things."""
        self.model.validate()
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"{key}={shown(getattr(self, key))} is not one of {', '.join(allowed)}", key
                )
        if not isinstance(self.device, str) or not DEVICE.fullmatch(self.device):
            raise ConfigError(
                f"device={shown(self.device)}: expected auto, cpu, cuda, cuda:N or mps", "device"
            )
        for key, (typ, ok, expected) in RANGES.items():
            _check(key, getattr(self, key), typ, ok, expected)
        for f in fields(self):
            if f.type in ("bool", bool):
                _check(f.name, getattr(self, f.name), bool, lambda v: True, "true or false")
        if not ACTIVATION_CHECKPOINTING.fullmatch(self.activation_checkpointing):
            raise ConfigError(
                f"activation_checkpointing={self.activation_checkpointing!r}: expected none, full or every_N (N >= 1)",
                "activation_checkpointing",
            )
        if self.seq_len > self.model.block_size:
            raise ConfigError(
                f"seq_len={self.seq_len} exceeds model.block_size={self.model.block_size}", "seq_len"
            )
        if self.optimizer == "muon" and self.fsdp:
            raise ConfigError(
                "optimizer=muon with fsdp=true is not supported: Newton-Schulz needs whole matrices, FSDP shards them",
                "optimizer",
            )
        if self.dtype == "fp16" and self.fsdp:
            raise ConfigError(
                "dtype=fp16 with fsdp=true is not supported: the gradient scaler would see only this rank's "
                "shard of the gradients; use bf16 (or fp32)"
            )
        if (self.schedule_clock == "time") != bool(self.time_budget):
            raise ConfigError("schedule_clock=time and time_budget > 0 (seconds) go together", "time_budget")
        if self.target_val_loss and not self.val_every:
            raise ConfigError("target_val_loss needs validation: set val_every > 0", "target_val_loss")
        if self.target_core and not self.core_every:
            raise ConfigError("target_core needs the CORE metric: set core_every > 0", "target_core")
        if self.val_every and not self.val_steps:
            raise ConfigError(
                "val_steps=0 with val_every>0 would report a loss of nothing; set val_every=0 instead",
                "val_steps",
            )
        if self.sample_every and not (self.sample_count and self.sample_tokens and self.sample_prompt):
            raise ConfigError(
                "sampling needs sample_count>0, sample_tokens>0 and a non-empty sample_prompt (or sample_every=0)",
                "sample_every",
            )
        return self

    def target_reached(self, step: int, metrics: dict) -> str | None:
        """Which of `step`'s measurements (val_loss, core) reached its target, if one did."""
        if (
            self.target_val_loss
            and metrics.get("val_step") == step
            and metrics["val_loss"] <= self.target_val_loss
        ):
            return "val_loss"
        if self.target_core and metrics.get("core_step") == step and metrics["core"] >= self.target_core:
            return "core"
        return None

    @property
    def muon_peak_lr(self) -> float:
        """muon_lr, or the recipe's: the preset's AdamW LR (set per width, as GPT-3's table does)
        times a ratio measured by `gpt2repro bench learn` (benchmarks/RESULTS.md)."""
        return self.muon_lr or MUON_LR_RATIO * self.max_lr

    @property
    def recompute_interval(self) -> int:
        return recompute_interval(self.activation_checkpointing)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        if isinstance(d.get("compile"), str):  # config.json before compile became a bool ("auto": on)
            d["compile"] = d["compile"] != "false"
        model = GPTConfig(**d.pop("model"))
        return cls(model=model, **d).validate()

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def recompute_interval(mode: str) -> int:
    """activation_checkpointing as a block interval: 0 (none), 1 (full), N (every_N)."""
    named = {"none": 0, "full": 1}
    return named[mode] if mode in named else int(mode.removeprefix("every_"))


POSITIVE = (int, lambda v: v > 0, "a positive integer")
COUNT = (int, lambda v: v >= 0, "an integer >= 0 (0 disables)")
CHOICES = {
    "dtype": ("auto", *DTYPE_NAMES),
    "resume": ("auto", "never", "require"),
    "hellaswag_style": ("completion", "harness"),
    "optimizer": ("adamw", "muon"),
    "schedule": ("cosine", "wsd"),
    "schedule_clock": ("steps", "time"),
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
    "core_every": COUNT,
    "core_max_per_task": (int, lambda v: v >= 0, "an integer >= 0 (0 = all items)"),
    "core_bundle": (str, lambda v: True, "a directory ('' = the cached download)"),
    "target_core": (float, lambda v: 0 <= v <= 1, "a CORE score in [0, 1] (0 = none)"),
    "sample_every": COUNT,
    "sample_prompt": (str, lambda v: True, "a string"),
    "sample_count": (int, lambda v: v >= 0, "an integer >= 0"),
    "sample_tokens": (int, lambda v: v >= 0, "an integer >= 0"),
    "ckpt_every": COUNT,
    "time_limit": (float, lambda v: 0 <= v < math.inf, "seconds >= 0 (0 = no limit)"),
    "time_budget": (float, lambda v: 0 <= v < math.inf, "seconds >= 0"),
    "log_every": COUNT,
}
