"""Setting config keys by name: `key=value` text from the command line (typed by the field's
current value) and typed values from a config file; the list of every key with its meaning."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..files.jsonio import shown
from .schema import CHAT_VOCAB_SIZE, GPT2_VOCAB_SIZE, ConfigError, GPTConfig, TrainConfig


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


TYPES = {"int": int, "float": float, "str": str, "bool": bool}  # the annotations, which are text here
EXPECTED = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def config_keys() -> list[tuple[str, type, Any, str]]:
    """Every key of a run, as (key, type, default, one-line meaning): the run's own, then model.*."""
    return [
        (prefix + f.name, TYPES[f.type], f.default, f.metadata["help"])
        for prefix, cls in (("", TrainConfig), ("model.", GPTConfig))
        for f in dataclasses.fields(cls)
        if f.name != "model"
    ]


def _locate(cfg: TrainConfig, key: str) -> tuple[Any, str, type]:
    """The dataclass holding `key`, the field's name there and its type; fields only (not methods,
    properties or `model` itself)."""
    target, name = (cfg.model, key[6:]) if key.startswith("model.") else (cfg, key)
    types = {f.name: TYPES.get(f.type) for f in dataclasses.fields(target) if f.name != "model"}
    if name not in types:
        valid = ", ".join(k for k, *_ in config_keys())
        raise ConfigError(f"unknown config key {key!r}; valid keys: {valid}", key)
    return target, name, types[name]


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply `key=value` strings (`model.n_layer=4` for the architecture) and re-validate."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        target, name, _ = _locate(cfg, key)
        _assign(target, name, _coerce(key, raw, getattr(target, name)))
    return cfg.validate()


def _assign(target: Any, name: str, value: Any) -> None:
    """Set a field; `model.chat=true` on GPT-2's vocabulary also extends it by the chat tokens (and
    false takes them away again), so the one key makes a chat model."""
    setattr(target, name, value)
    if isinstance(target, GPTConfig) and name == "chat" and isinstance(value, bool):
        sizes = {True: (GPT2_VOCAB_SIZE, CHAT_VOCAB_SIZE), False: (CHAT_VOCAB_SIZE, GPT2_VOCAB_SIZE)}[value]
        if target.vocab_size == sizes[0]:
            target.vocab_size = sizes[1]


def set_value(cfg: TrainConfig, key: str, value: Any) -> None:
    """Set `key` to a typed value (a file's): an int does for a float and an integral number for an
    int, as in `key=value` text; any other type is refused. Ranges are `validate`'s."""
    target, name, typ = _locate(cfg, key)
    if typ is float and type(value) is int:
        value = float(value)
    elif typ is int and type(value) is float and value.is_integer():
        value = int(value)
    if type(value) is not typ:  # exactly: a bool is not an int here
        raise ConfigError(f"{key}={shown(value)}: expected {EXPECTED[typ]}", key)
    if typ is str and not value.isascii():
        try:  # JSON's "\ud800": a lone surrogate, text no file or terminal can hold
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(
                f"{key}={shown(value)}: not valid Unicode text (a lone surrogate)", key
            ) from None
    _assign(target, name, value)
