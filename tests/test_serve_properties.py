"""Property-based tests of every HTTP request body (issue #28, item 2): random JSON values in every
field of each endpoint's body get a 2xx or a 4xx with OpenAI's error JSON, never a 500 or a
traceback. Few examples, derandomized: the file runs in seconds, the same cases every time."""

from __future__ import annotations

import http.client
import json
import logging

import pytest

pytest.importorskip("starlette", reason="the serve extra (starlette, uvicorn) is not installed")
hypothesis = pytest.importorskip("hypothesis", reason="the dev extra's hypothesis is not installed")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gpt2repro.serve.app import create_app  # noqa: E402
from gpt2repro.serve.run import ServerThread, served_model  # noqa: E402

SURROGATE = st.integers(0xD800, 0xDFFF).map(chr)  # a lone surrogate: JSON can escape it, UTF-8 cannot hold it
TEXT = st.text(st.characters(categories=["L", "N", "P", "S", "Zs"]) | SURROGATE, max_size=12)
SCALARS = st.none() | st.booleans() | st.integers() | st.integers(-(2**70), 2**70) | st.floats() | TEXT
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)  # fmt: skip
IDS = st.lists(st.integers(-5, 60_000), max_size=6)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool"]) | JSON,
                                 "content": st.text(max_size=20) | JSON})  # fmt: skip
FIELDS = {
    "/v1/completions": {
        "prompt": st.text(max_size=20) | IDS | st.lists(st.text(max_size=8) | IDS, max_size=3) | JSON,
        "max_tokens": st.integers(-2, 10) | JSON, "temperature": st.floats(-1, 3) | JSON,
        "top_p": st.floats(-1, 2) | JSON, "top_k": st.integers(-3, 60_000) | JSON, "n": st.integers(-1, 40) | JSON,
        "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=5) | JSON, "seed": JSON,
        "echo": JSON, "logprobs": st.integers(-1, 25) | JSON, "stream": st.booleans() | JSON, "stream_options": JSON,
    },
    "/v1/chat/completions": {
        "messages": st.lists(MESSAGE, max_size=3) | JSON, "max_tokens": st.integers(-1, 10) | JSON,
        "temperature": JSON, "top_p": JSON, "top_k": JSON, "n": JSON, "stop": JSON, "seed": JSON,
        "stream": st.booleans() | JSON, "logprobs": JSON,
    },
    "/tokenize": {"prompt": st.text(max_size=20) | JSON, "messages": st.lists(MESSAGE, max_size=2) | JSON},
    "/detokenize": {"tokens": IDS | JSON},
}  # fmt: skip


@pytest.fixture(scope="module")
def server(run_dir):
    from gpt2repro.checkpoint.gathered import load_model

    served = served_model(load_model(run_dir).eval(), "m", 4)
    with ServerThread(create_app(served, max_tokens_limit=4)) as s:
        yield s
    served.engine.stop()


def _nested(field: str, depth: int) -> bytes:
    """A body with `field` nested `depth` arrays deep (more than json.dumps would write)."""
    return b'{"model": "m", "%s": %s1%s}' % (field.encode(), b"[" * depth, b"]" * depth)


def bodies(path: str):
    fields = FIELDS[path]
    chosen = st.fixed_dictionaries({}, optional={"model": st.just("m") | JSON, **fields})
    deep = st.builds(_nested, st.sampled_from(sorted(fields)), st.integers(10, 5000))
    return st.one_of(chosen.map(lambda b: {"model": "m", **b}), chosen, JSON, deep, st.binary(max_size=40))


def post(server, path: str, body) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=60)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json"})
    r = conn.getresponse()
    out = r.status, r.read()
    conn.close()
    return out


@pytest.mark.parametrize("path", list(FIELDS))
def test_any_json_body_is_a_2xx_or_a_4xx(server, path, caplog):
    @settings(max_examples=60, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
    @given(bodies(path))
    def check(body):
        status, raw = post(server, path, body)
        assert status < 500, (body, raw)
        if status >= 400:
            error = json.loads(raw)["error"]
            assert isinstance(error["message"], str) and "\n" not in error["message"]
        elif raw.startswith(b"data: "):
            assert raw.rstrip().endswith(b"data: [DONE]") and b'"error"' not in raw, (body, raw)

    with caplog.at_level(logging.ERROR):
        check()
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
