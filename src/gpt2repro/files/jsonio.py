"""JSON read from a user's files, the same way in every reader (config files, `prepare` sources,
conversations, HellaSwag): a UTF-8 byte-order mark before the first line is skipped, nesting deeper
than Python can parse is "not valid JSON" like any other malformed text (not a RecursionError), a
`.json` file that is one JSON array holds records, and a value shown in an error message is cut
short (a hostile value's full repr can be megabytes, or too deep to print)."""

from __future__ import annotations

import codecs
import gzip
import json
import reprlib
from pathlib import Path
from typing import Any

BOM = "\ufeff"
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother = 2, 60, 60
_SHOWN.maxlist = _SHOWN.maxdict = _SHOWN.maxtuple = 4


class NotJSON(ValueError):
    """Text that is not one JSON value; `problem` says why in a few words, `lineno` where, when known."""

    def __init__(self, problem: str, lineno: int | None = None):
        super().__init__(problem)
        self.problem, self.lineno = problem, lineno


def loads(text: str | bytes) -> Any:
    """One JSON value of a line or a file, a leading byte-order mark skipped."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text.removeprefix(BOM))
    except json.JSONDecodeError as e:
        raise NotJSON(f"not valid JSON ({e.msg})", e.lineno) from None
    except RecursionError:
        raise NotJSON("not valid JSON (nested too deeply to read)") from None
    except UnicodeDecodeError:
        raise NotJSON("not UTF-8 text") from None


def open_text(path: str | Path):
    """A text file (gzipped when its name ends in .gz) for reading lines, a leading BOM dropped."""
    opener = gzip.open if str(path).endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8-sig")


def is_array_file(path: str | Path) -> bool:
    """Whether a `.json` / `.json.gz` file is one JSON array (Alpaca's alpaca_data.json) rather than
    JSON lines: its first character that is not blank (nor a BOM) is `[`."""
    name = str(path)
    if not name.endswith((".json", ".json.gz")):
        return False
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()
    return head.startswith(b"[")


def array_records(path: str | Path) -> list:
    """The records of a file that is one JSON array; NotJSON when it is not valid JSON."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        value = loads(f.read())
    if not isinstance(value, list):
        raise NotJSON("not one JSON array of records")
    return value


def lone_surrogate(value: Any, name: str) -> str | None:
    """Where in `value` (the field `name`) a string holds a lone surrogate, JSON's "\\ud800" escape:
    not valid Unicode, so no tokenizer or file can encode it (`endings[1]`); None when nowhere."""
    todo = [(name, value)]
    while todo:
        where, value = todo.pop(0)
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return where
        elif isinstance(value, list):
            todo += [(f"{where}[{i}]", v) for i, v in enumerate(value)]
        elif isinstance(value, dict):
            todo += [(f"{where}.{k}", v) for k, v in value.items()]
    return None


def shown(value: Any) -> str:
    """`repr(value)` for an error message: short, and never too deep to print."""
    return _SHOWN.repr(value)
