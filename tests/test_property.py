"""Property-based tests (hypothesis): random JSON values — of every type, nested, huge integers,
NaN, lone surrogates, spelled special tokens — put into each field of the files users hand us (a
config file, a conversation record of each layout, a `prepare` source row, a HellaSwag row). Each
file is either read or refused with one line (a UserError naming the file); never any other
exception. Derandomized and small, so every run draws the same few hundred cases in seconds."""

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import HELLASWAG_ROW
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gpt2repro.config.configfile import to_toml
from gpt2repro.config.overrides import config_keys
from gpt2repro.config.presets import train_config
from gpt2repro.data.conversations import prepare_conversations
from gpt2repro.data.prepare import prepare
from gpt2repro.errors import UserError
from gpt2repro.evals import hellaswag

CHECKS = settings(
    max_examples=80, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TEXT = st.text(alphabet=st.characters(exclude_categories=()), max_size=12) | st.sampled_from(
    ["<|endoftext|>", "<|user_end|>", "user", "assistant", "human", "\ufeff", "\ud800", ""]
)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | TEXT
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)


def _one_line(error: UserError, path: Path) -> None:
    message = str(error)
    assert "\n" not in message and str(path) in message, message


@contextlib.contextmanager
def _written(text: str, suffix: str) -> Iterator[Path]:
    """`text` in a new file of its own, removed afterwards (hypothesis runs many cases in one test)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"input{suffix}"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        yield path


CONFIG_KEYS = ["preset", "model", *[key for key, *_ in config_keys()]]


def _nested(key: str, value) -> dict:
    """A config of the cpu-tiny preset with `key` (model.* inside its table) set to `value`."""
    if key.startswith("model."):
        return {"preset": "cpu-tiny", "model": {key[6:]: value}}
    return {"preset": "cpu-tiny", key: value}


@CHECKS
@given(key=st.sampled_from(CONFIG_KEYS), value=JSON_VALUES)
@example(key="sample_prompt", value="\ud800")  # JSON's escape of a lone surrogate: no file can hold it
@example(key="init_from", value="x\udc80")
@example(key="preset", value=[["cpu-tiny"]])
def test_any_value_in_any_config_key_is_read_or_refused_in_one_line(key, value):
    with _written(json.dumps(_nested(key, value)), ".json") as path:
        try:
            cfg = train_config(file=path)
        except UserError as e:
            _one_line(e, path)
        else:
            to_toml(cfg, "test").encode("utf-8")  # what was accepted can be written back


def _conversation(layout: str, field: str, value) -> dict:
    """A good record of `layout` with `field` (a key, or `turn.key` of its second turn) set to `value`."""
    turns = {
        "messages": ("messages", "role", "content", ("user", "assistant")),
        "sharegpt": ("conversations", "from", "value", ("human", "gpt")),
    }
    if layout == "instruction":
        return {"instruction": "Say hi", "input": "", "output": "hi", field: value}
    key, speaker, text, (asker, answerer) = turns[layout]
    record = {key: [{speaker: asker, text: "Hi"}, {speaker: answerer, text: "Hello."}]}
    if field == "turns":
        record[key] = value
    elif field == "turn":
        record[key][1] = value
    elif field in ("speaker", "text"):
        record[key][1][speaker if field == "speaker" else text] = value
    else:
        record[field] = value
    return record


FIELDS = [("messages", f) for f in ("turns", "turn", "speaker", "text", "extra")]
FIELDS += [("sharegpt", f) for f in ("turns", "turn", "speaker", "text", "extra")]
FIELDS += [("instruction", f) for f in ("instruction", "input", "context", "output", "response")]


@CHECKS
@given(where=st.sampled_from(FIELDS), value=JSON_VALUES)
def test_any_value_in_any_field_of_a_conversation_is_prepared_or_refused_in_one_line(enc, where, value):
    with _written(json.dumps(_conversation(*where, value)) + "\n", ".jsonl") as path:
        try:
            m = prepare_conversations(
                [str(path)], path.parent / "out", seq_len=32, val_tokens=0, progress=False
            )
        except UserError as e:
            _one_line(e, path.parent)
        else:
            assert m["counts"]["records"] == 1


@CHECKS
@given(value=JSON_VALUES, array=st.booleans())
def test_any_value_as_a_documents_text_is_prepared_or_refused_in_one_line(enc, value, array):
    row = {"text": value}
    text = json.dumps([row]) if array else json.dumps(row) + "\n"
    with _written(text, ".json" if array else ".jsonl") as path:
        try:
            prepare([str(path)], path.parent / "out", val_tokens=0, workers=1, progress=False)
        except UserError as e:
            _one_line(e, path.parent)


@CHECKS
@given(field=st.sampled_from([*HELLASWAG_ROW, "endings.2"]), value=JSON_VALUES)
def test_any_value_in_any_field_of_a_hellaswag_row_is_scored_or_refused_in_one_line(enc, field, value):
    row = json.loads(json.dumps(HELLASWAG_ROW))
    if field == "endings.2":
        row["endings"][2] = value
    else:
        row[field] = value
    with _written(json.dumps(row) + "\n", ".jsonl") as path:
        try:
            (example,) = hellaswag.load_examples(path)
        except UserError as e:
            _one_line(e, path)
        else:
            for style in hellaswag.STYLES:
                hellaswag.render(example, style)


@pytest.mark.parametrize("depth", [10, 100_000])
def test_nesting_of_any_depth_is_read_or_refused_in_one_line(tmp_path, enc, depth):
    """Deeper than Python's parser recurses: the same one line as any malformed JSON."""
    nested = "[" * depth + "]" * depth
    chat_line = '{"messages": ' + nested + "}\n"
    files = {
        "c.json": '{"preset": "cpu-tiny", "seed": ' + nested + "}",
        "c.toml": 'preset = "cpu-tiny"\nseed = ' + nested + "\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError) as refused:
            train_config(file=tmp_path / name)
        _one_line(refused.value, tmp_path / name)
    (tmp_path / "chat.jsonl").write_text(chat_line)
    with pytest.raises(UserError) as refused:
        prepare_conversations([str(tmp_path / "chat.jsonl")], tmp_path / "out", seq_len=32, progress=False)
    _one_line(refused.value, tmp_path / "chat.jsonl")
