"""A token's text (issue #29, item 3): pieces and offsets around multi-byte characters equal what
transformers' fast tokenizer maps (`return_offsets_mapping`), through `tokentext` and through the
server's echoed logprobs; after a stop string the tokens stop where the text stops."""

from __future__ import annotations

import json
import urllib.request

import pytest
import torch

from gpt2repro.text.tokentext import TextStream, pieces_of

transformers = pytest.importorskip("transformers")

TEXTS = ["I ❤️ 日本 🙂 ok", "naïve café, e\u0301 o\u0308 — ✓", "👩‍👩‍👧 家族 and 🇯🇵 flags", "plain ascii text"]


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    from gpt2repro.text.tokenizer import write_hf_tokenizer

    out = tmp_path_factory.mktemp("tok")
    write_hf_tokenizer(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.is_fast  # the tokenizers library's offsets, an independent reference
    return tok


@pytest.mark.parametrize("text", TEXTS)
def test_offsets_are_where_transformers_maps_each_token(fast, enc, text):
    mapped = fast(text, return_offsets_mapping=True)
    pieces = pieces_of(enc.encode_ordinary(text), enc.decode_single_token_bytes)
    assert [p.payload for p in pieces] == mapped["input_ids"]
    assert [p.offset for p in pieces] == [start for start, _ in mapped["offset_mapping"]]
    assert "".join(p.text for p in pieces) == text  # each character once, in the token completing it
    for p, (_, end) in zip(pieces, mapped["offset_mapping"]):
        assert p.offset + len(p.text) <= end  # a piece never runs past the token's own characters


def test_tokens_after_a_stop_string_are_cut_with_the_text(enc):
    ids = enc.encode("café ❤️ then STOP and more")
    stream = TextStream(enc.decode_single_token_bytes, stop=("STOP",))
    released = []
    out = ""
    for t in ids:
        out += stream.feed(t)
        released += stream.released()
    out += stream.finish()
    released += stream.released()
    assert out == "café ❤️ then " and stream.stopped
    assert "".join(p.text for p in released) == out  # no token past the stop, none repeated
    assert [p.offset for p in released] == [p.offset for p in pieces_of(ids, enc.decode_single_token_bytes)][
        : len(released)
    ]


def test_the_held_back_text_costs_linear_time_in_long_stop_strings(enc):
    """4 stop strings of 256 characters (the server's limit) against 2,000 tokens of text that keeps
    matching their beginnings: the check stays well under a second."""
    import time

    stop = tuple(("ab" * 200)[:255] + c for c in "wxyz")
    stream = TextStream(lambda t: b"ab", stop=stop)
    started = time.perf_counter()
    for _ in range(2000):
        stream.feed(0)
    assert time.perf_counter() - started < 1.0
    assert stream.finish() and not stream.stopped


def _post(url: str, body: dict) -> bytes:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read()


def _bytes_of(token: str) -> bytes:
    return bytes.fromhex(token[6:].replace("\\x", "")) if token.startswith("bytes:") else token.encode()


def _not_text(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_the_server_gives_offsets_and_tokens_of_multibyte_text_and_cuts_them_at_a_stop(run_dir, fast, enc):
    pytest.importorskip("starlette", reason="the serve extra is not installed")
    from gpt2repro.checkpoint.gathered import load_model
    from gpt2repro.serve.app import create_app
    from gpt2repro.serve.run import ServerThread, served_model

    served = served_model(load_model(run_dir).eval(), "m", 2)
    text = TEXTS[0]
    echo = {"model": "m", "prompt": text, "echo": True, "logprobs": 0, "max_tokens": 0}
    greedy = {"model": "m", "prompt": "ROMEO:", "max_tokens": 16, "temperature": 0, "logprobs": 0}
    try:
        with ServerThread(create_app(served)) as s:
            url = s.url + "/v1/completions"
            choice = json.loads(_post(url, echo))["choices"][0]
            full = json.loads(_post(url, greedy))["choices"][0]["text"]
            stop = full[len(full) // 2 : len(full) // 2 + 2]
            cut = json.loads(_post(url, {**greedy, "stop": [stop]}))["choices"][0]
            lines = _post(url, {**greedy, "stop": [stop], "stream": True}).decode().splitlines()
    finally:
        served.engine.stop()
    mapped = fast(text, return_offsets_mapping=True)["offset_mapping"]
    assert choice["text"] == text
    assert choice["logprobs"]["text_offset"] == [start for start, _ in mapped]
    # a token that is part of a character is spelled by its bytes (OpenAI's `bytes:\\xe6`); the rest are
    # the text they complete: all of them, as bytes, join into the text
    tokens = choice["logprobs"]["tokens"]
    assert b"".join(map(_bytes_of, tokens)).decode() == text and "\ufffd" not in "".join(tokens)
    assert [t.startswith("bytes:") for t in tokens] == [
        _not_text(enc.decode_single_token_bytes(t)) for t in enc.encode_ordinary(text)
    ]
    assert torch.tensor(choice["logprobs"]["token_logprobs"][1:]).isfinite().all()
    assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"
    assert "".join(cut["logprobs"]["tokens"]) == cut["text"]  # no token past the stop string
    assert cut["logprobs"]["text_offset"] == [
        sum(map(len, cut["logprobs"]["tokens"][:i])) for i in range(len(cut["logprobs"]["tokens"]))
    ]
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    streamed = [t for c in chunks for ch in c["choices"] if ch["logprobs"] for t in ch["logprobs"]["tokens"]]
    assert streamed == cut["logprobs"]["tokens"]


def test_padded_vocabulary_rows_are_spelled_by_their_ids_and_never_collide():
    """Rows past GPT-2's 50,257 tokens have no bytes: each alternative keeps its own entry."""
    from types import SimpleNamespace

    from gpt2repro.text.tokentext import Piece, logprobs_object

    info = SimpleNamespace(id=50300, logprob=-0.5, top=[(50300, -0.5), (50301, -0.7), (50302, -0.9)])
    out = logprobs_object([Piece(info, 0, "")], lambda t: b"" if t >= 50257 else bytes([t % 256]))
    assert out["tokens"] == ["<|id:50300|>"]
    assert out["top_logprobs"] == [{"<|id:50300|>": -0.5, "<|id:50301|>": -0.7, "<|id:50302|>": -0.9}]
