"""Config files: a run's keys read from TOML or JSON (remembering each TOML key's line, so an error
can point at it), a resolved config written back as TOML (each key with its meaning as a comment)
or as the JSON runs write, and the reference table of every key.

The TOML writer is our own: the shape is flat keys plus one [model] table, and no TOML library we
could depend on writes comments."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..files import jsonio
from .overrides import config_keys
from .schema import CHOICES, ConfigError, TrainConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package (a dependency there)
    import tomli as tomllib

_HEADER = re.compile(r"\s*\[\s*([\w.\-\"']+)\s*\]")
_KEY = re.compile(r"\s*([\w.\-\"']+)\s*=")


def _toml_lines(text: str) -> dict[str, int]:
    """The line of each key (`model.n_layer`) and table header: good enough for error messages
    about our flat shape (a multi-line string that looks like a key could mislead it, no more)."""
    lines: dict[str, int] = {}
    table = ""
    for number, line in enumerate(text.splitlines(), 1):
        if header := _HEADER.match(line):
            table = re.sub("[\"']", "", header[1])
            lines.setdefault(table, number)
        elif key := _KEY.match(line):
            name = re.sub("[\"']", "", key[1])
            lines.setdefault(f"{table}.{name}" if table else name, number)
    return lines


def _parse(path: Path, text: str) -> tuple[Any, dict[str, int]]:
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            return tomllib.loads(text), _toml_lines(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        except RecursionError:  # arrays nested thousands deep
            raise ConfigError(f"{path}: not valid TOML: nested too deeply to read") from None
    if suffix == ".json":
        try:
            return jsonio.loads(text), {}
        except jsonio.NotJSON as e:
            where = f"{path}:{e.lineno}" if e.lineno else str(path)
            raise ConfigError(f"{where}: {e.problem}") from None
    raise ConfigError(f"{path}: a config file is .toml or .json (a run writes RUN/config.json)")


def read_config_file(path: str | Path) -> tuple[dict[str, Any], Callable[[str], str]]:
    """The file's keys, flat (`model.n_layer`), and `where(key)`: 'FILE:LINE' for TOML, else 'FILE'."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is no key
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a directory, not a config file (a run's is RUN/config.json)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
    data, lines = _parse(path, text)

    def where(key: str) -> str:
        return f"{path}:{lines[key]}" if key in lines else str(path)

    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected an object of config keys, not {type(data).__name__}")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key == "model" and not isinstance(value, dict):
            raise ConfigError(
                f"{where(key)}: model={jsonio.shown(value)}: expected a table of architecture keys", key
            )
        if isinstance(value, dict):  # [model], or a table that names no key (refused by key)
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat, where


def _toml_string(text: str) -> str:
    """A TOML basic string. JSON's escapes are TOML's; TOML also wants DEL escaped, and takes no
    surrogate escapes, so other characters stay as they are."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any, typ: type) -> str:
    if typ is bool:
        return "true" if value else "false"
    if typ is float:
        return repr(float(value))  # 0.0006, 1e-08, inf, nan: all TOML floats
    return str(value) if typ is int else _toml_string(value)


def to_toml(cfg: TrainConfig, source: str) -> str:
    """Every key of `cfg` as a TOML file, each with its meaning; `source` says what it resolves."""
    rows = [
        (key, f"{key.removeprefix('model.')} = {_toml_value(_value(cfg, key), typ)}", meaning)
        for key, typ, _, meaning in config_keys()
    ]
    width = min(40, max(len(line) for _, line, _ in rows))
    out = [
        f"# gpt2repro {source}: every key of the run, resolved. Edit it, then run it with",
        "#   gpt2repro train --config FILE --data DIR --out RUN   (key=value overrides still win)",
        "# Each key's type, default and meaning: gpt2repro presets --keys",
        "",
    ]
    for key, line, meaning in rows:
        if key == "model.block_size":
            out += ["", "[model]"]
            if cfg.init_from:
                out += ["# init_from is set: the run takes these from the weights (vocab_multiple excepted)"]
        out.append(f"{line:<{width}}  # {meaning}")
    return "\n".join(out) + "\n"


def _value(cfg: TrainConfig, key: str) -> Any:
    return getattr(cfg.model, key[6:]) if key.startswith("model.") else getattr(cfg, key)


def _shown(value: Any, typ: type) -> str:
    """A default as one writes it in `key=value`."""
    if typ is str:
        return value or '""'
    return _toml_value(value, typ)


def keys_table(markdown: bool = False) -> str:
    """Every key with its type (or its choices), default and meaning: as text, or as the Markdown
    table docs/config.md holds."""
    rows = [
        (key, "|".join(CHOICES[key]) if key in CHOICES else typ.__name__, _shown(default, typ), meaning)
        for key, typ, default, meaning in config_keys()
    ]
    if markdown:
        lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
        return "\n".join(lines + [_markdown_row(*row) for row in rows])
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        f"{k:<{widths[0]}}  {t:<{widths[1]}}  {d:<{widths[2]}}  {m}".rstrip() for k, t, d, m in rows
    )


def _markdown_row(key: str, typ: str, default: str, meaning: str) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    return f"| `{key}` | {cell(typ)} | `{default}` | {cell(meaning)} |"
