"""`gpt2repro serve` against hostile and careless clients (issue #29, items 5-8 and 10): every request
gets a 4xx or a 2xx whatever its bytes, the work of one request is bounded and freed when its client
leaves, requests take turns for slots, browsers cannot drive a key-less server, and the tokenizer and
metrics routes. Timing bounds are assertions."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time

import pytest

pytest.importorskip("starlette", reason="the serve extra (starlette, uvicorn) is not installed")
pytest.importorskip("prometheus_client", reason="the serve extra's prometheus-client is not installed")

from gpt2repro.generation.sampling import Sampling  # noqa: E402
from gpt2repro.serve.app import create_app  # noqa: E402
from gpt2repro.serve.engine import Engine, Job  # noqa: E402
from gpt2repro.serve.run import ServerThread, served_model  # noqa: E402
from gpt2repro.text import chat  # noqa: E402

pytestmark = pytest.mark.serial  # alone: its timing bounds are asserted

ALLOWED = "http://allowed.example"


@pytest.fixture(scope="module")
def model(run_dir):
    from gpt2repro.checkpoint.gathered import load_model

    return load_model(run_dir).eval()


@pytest.fixture(scope="module")
def server(model):
    served = served_model(model, "m", 4)
    with ServerThread(create_app(served, max_tokens_limit=8, cors_origins=frozenset({ALLOWED}))) as s:
        s.served = served
        yield s
    served.engine.stop()


def request(server, method: str, path: str, body=b"", headers: dict | None = None, timeout: float = 60):
    """(status, headers, parsed JSON or raw bytes) of one raw HTTP request."""
    conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=timeout)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    kind = {"Content-Type": "application/json"} if method == "POST" else {}
    conn.request(method, path, data if method == "POST" else None, {**kind, **(headers or {})})
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    try:
        return r.status, dict(r.getheaders()), json.loads(raw)
    except ValueError:
        return r.status, dict(r.getheaders()), raw


def test_chat_requests_that_leave_no_room_for_a_reply_are_400s(chat_run_dir):
    from gpt2repro.checkpoint.gathered import load_model

    served = served_model(load_model(chat_run_dir).eval(), "c", 1)
    words = " ".join(["hello"] * 124)  # a token each: with the 4 of the template, the whole context
    try:
        with ServerThread(create_app(served)) as s:
            full = request(s, "POST", "/v1/chat/completions",
                           {"model": "c", "messages": [{"role": "user", "content": words}]})  # fmt: skip
            zero = request(s, "POST", "/v1/chat/completions",
                           {"model": "c", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0})  # fmt: skip
    finally:
        served.engine.stop()
    prompt = chat.render([{"role": "user", "content": words}], add_generation_prompt=True)
    assert len(prompt) == 128  # the whole context
    assert full[0] == 400 and "context is 128" in full[2]["error"]["message"], full
    assert zero[0] == 400 and "'max_tokens' must be at least 1" in zero[2]["error"]["message"], zero


def test_hostile_json_is_a_4xx_quickly(server):
    cases = [
        b'{"model": "m", "prompt": ' + b"[" * 1000 + b"]" * 1000 + b"}",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"model": "m", "prompt": ' + b"[" * 20 + b"1" + b"]" * 20 + b"}",
        b'{"model": "\\ud800", "prompt": "Hi"}',
        b'{"model": "m", "prompt": "Hi \\udfff"}',
        b'{"model": "m", "prompt": "Hi", "max_tokens": 1e999}',
        b'{"model": "m", "prompt": "Hi", "temperature": 1e999}',
        b'{"model": "m", "prompt": "Hi", "temperature": NaN}',
        b'{"model": "m", "prompt": "Hi", "stop": ["' + b"x" * 200_000 + b'"]}',
        b'{"model": "m", "prompt": ' + json.dumps(["Hi"] * 1024).encode() + b', "n": 32}',
    ]
    for body in cases:
        started = time.perf_counter()
        status, _, answer = request(server, "POST", "/v1/completions", body)
        assert 400 <= status < 500 and "error" in answer, (body[:60], status, answer)
        assert time.perf_counter() - started < 2.0, body[:60]
    assert request(server, "GET", "/health")[0] == 200


def _slowed(served, seconds: float):
    decode = served.engine._decode

    def slow():
        time.sleep(seconds)
        decode()

    served.engine._decode = slow
    return decode


def test_a_non_streaming_request_whose_client_left_frees_its_slots(model):
    served = served_model(model, "m", 4)
    _slowed(served, 0.05)  # 64 tokens would take over 3 s
    try:
        with ServerThread(create_app(served)) as s:
            sock = socket.create_connection(s.url.removeprefix("http://").split(":"))
            body = json.dumps({"model": "m", "prompt": "a", "max_tokens": 64, "n": 4}).encode()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
            deadline = time.monotonic() + 10
            while request(s, "GET", "/health")[2]["running"] < 4 and time.monotonic() < deadline:
                time.sleep(0.02)
            sock.close()  # gone before the answer
            left = time.monotonic()
            while request(s, "GET", "/health")[2]["running"] and time.monotonic() < left + 10:
                time.sleep(0.02)
            assert time.monotonic() - left < 1.0  # freed at once, not after its 64 tokens
    finally:
        served.engine.stop()


def test_a_disconnect_mid_upload_is_one_log_line(server, caplog):
    with caplog.at_level(logging.INFO):
        sock = socket.create_connection(server.url.removeprefix("http://").split(":"))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\": ")  # fmt: skip
        time.sleep(0.2)
        sock.close()
        deadline = time.monotonic() + 5
        while (
            not any("disconnected" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline
        ):
            time.sleep(0.05)
    lines = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(lines) == 1 and lines[0].name == "gpt2repro.serve", [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]  # no traceback


def test_requests_take_turns_for_slots(model):
    """A request of 8 sequences came first, on a 2-slot engine: the one-sequence request after it
    gets the second slot at once, not after the 8 (it finishes before the big one's third starts)."""
    order, done = [], threading.Semaphore(0)

    def emitter(name):
        def emit(event):
            if event[0] in ("start", "done"):
                order.append((name, event[0]))
            if event[0] == "done":
                done.release()

        return emit

    engine = Engine(model, slots=2)
    for i in range(8):
        engine.submit(Job([464, 5822], 6, emitter(f"big{i}"), Sampling(0), group="big"))
    engine.submit(Job([464, 5822], 6, emitter("small"), Sampling(0), group="small"))
    engine.start()
    for _ in range(9):
        assert done.acquire(timeout=60)
    engine.stop()
    assert order.index(("small", "done")) < order.index(("big2", "start")), order


def test_a_stop_string_is_bounded_and_its_check_does_not_stall_the_server(server):
    stop = ["ab" * 127 + c for c in "wxyz"]  # four of the longest allowed
    body = {"model": "m", "prompt": "ROMEO:", "max_tokens": 8, "stop": stop, "n": 16}
    worker = threading.Thread(target=request, args=(server, "POST", "/v1/completions", body))
    worker.start()
    started = time.perf_counter()
    assert request(server, "GET", "/health")[0] == 200
    assert time.perf_counter() - started < 0.5
    worker.join(60)
    status, _, answer = request(server, "POST", "/v1/completions", {**body, "stop": ["x" * 257]})
    assert status == 400 and "256" in answer["error"]["message"]


def test_browsers_cannot_drive_the_server_unless_allowed(server):
    hi = {"model": "m", "prompt": "Hi", "max_tokens": 1}
    as_text = request(
        server, "POST", "/v1/completions", json.dumps(hi).encode(), {"Content-Type": "text/plain"}
    )
    assert as_text[0] == 415
    rebound = request(server, "POST", "/v1/completions", hi, {"Host": "attacker.example"})
    assert rebound[0] == 403 and "attacker.example" in rebound[2]["error"]["message"]
    assert request(server, "GET", "/v1/models", headers={"Host": "localhost:1"})[0] == 200
    other = request(server, "POST", "/v1/completions", hi, {"Origin": "http://evil.example"})
    assert other[0] == 403 and "access-control-allow-origin" not in {k.lower() for k in other[1]}
    same = request(server, "POST", "/v1/completions", hi, {"Origin": server.url})
    assert same[0] == 200
    allowed = request(server, "POST", "/v1/completions", hi, {"Origin": ALLOWED})
    assert allowed[0] == 200 and allowed[1]["access-control-allow-origin"] == ALLOWED
    preflight = request(server, "OPTIONS", "/v1/completions", headers={
        "Origin": ALLOWED, "Access-Control-Request-Method": "POST"})  # fmt: skip
    assert preflight[0] == 204 and "Authorization" in preflight[1]["access-control-allow-headers"]
    assert request(server, "OPTIONS", "/v1/completions", headers={"Origin": "http://evil.example"})[0] == 403


def test_the_bearer_scheme_is_case_insensitive(model):
    served = served_model(model, "m", 1)
    try:
        with ServerThread(create_app(served, api_key="k3y")) as s:
            codes = [request(s, "GET", "/v1/models", headers={"Authorization": a})[0]
                     for a in ("Bearer k3y", "bearer k3y", "BEARER  k3y", "Bearer K3Y", "Basic k3y", "k3y")]  # fmt: skip
    finally:
        served.engine.stop()
    assert codes == [200, 200, 200, 401, 401, 401]


def test_tokenize_detokenize_and_metrics(server, enc):
    from prometheus_client.parser import text_string_to_metric_families

    text = "Hello, wörld 🙂"
    status, _, tokens = request(server, "POST", "/tokenize", {"model": "m", "prompt": text})
    assert (
        status == 200
        and tokens["tokens"] == enc.encode_ordinary(text)
        and tokens["count"] == len(tokens["tokens"])
    )
    status, _, back = request(server, "POST", "/detokenize", {"model": "m", "tokens": tokens["tokens"]})
    assert status == 200 and back["prompt"] == text
    assert request(server, "POST", "/detokenize", {"model": "m", "tokens": [10**9]})[0] == 400
    status, _, r = request(server, "POST", "/v1/completions", {"model": "m", "prompt": text, "max_tokens": 3})
    assert status == 200
    status, headers, raw = request(server, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(raw.decode()) for s in family.samples}  # fmt: skip
    assert samples[("gpt2repro_requests_total", (("route", "/tokenize"), ("status", "200")))] >= 1
    assert samples[("gpt2repro_generation_tokens_total", ())] >= 3
    assert samples[("gpt2repro_prompt_tokens_total", ())] >= len(tokens["tokens"])
    assert samples[("gpt2repro_time_to_first_token_seconds_count", ())] >= 1
    assert samples[("gpt2repro_time_per_output_token_seconds_count", ())] >= 2
    assert ("gpt2repro_queue_length", ()) in samples and ("gpt2repro_running_slots", ()) in samples


def test_the_host_names_a_server_answers_follow_its_address():
    from gpt2repro.serve.guard import ANY_ADDRESS, LOOPBACK_NAMES, _answers, allowed_hosts, hostname

    assert allowed_hosts("127.0.0.1") == LOOPBACK_NAMES and allowed_hosts("localhost") == LOOPBACK_NAMES
    assert allowed_hosts("192.168.1.5") == {"192.168.1.5"}
    assert allowed_hosts("127.0.0.1", ["*"]) is None
    own = {socket.gethostname().lower(), socket.getfqdn().lower()}
    assert allowed_hosts("0.0.0.0") == LOOPBACK_NAMES | own | {ANY_ADDRESS}
    assert allowed_hosts("0.0.0.0", ["Box.Example."]) == LOOPBACK_NAMES | own | {ANY_ADDRESS, "box.example"}
    # bound to every interface: IP addresses and this machine's names, not a rebound DNS name
    every = allowed_hosts("0.0.0.0")
    assert _answers(every, "10.1.2.3") and _answers(every, "::1") and not _answers(every, "evil.example")
    assert [hostname(h) for h in ("[::1]:8000", "::1", "LocalHost:80", "a.example.")] == [
        "::1",
        "::1",
        "localhost",
        "a.example",
    ]


def _metric_samples(raw: bytes) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        s.name: s.value for family in text_string_to_metric_families(raw.decode()) for s in family.samples
    }


def test_prompt_and_cached_prompt_tokens_are_both_counted_per_sequence(model):
    """The work done: n sequences of a prompt each run (or find cached) its tokens, so the cached
    count can never pass the prompt count."""
    served = served_model(model, "m", 4)
    prompt = [464, 2068, 7586, 21831, 18045, 625, 262, 16931]  # 8 tokens
    try:
        with ServerThread(create_app(served)) as s:
            for _ in range(3):
                body = {"model": "m", "prompt": prompt, "max_tokens": 2, "n": 4, "temperature": 0}
                assert request(s, "POST", "/v1/completions", body)[0] == 200
            samples = _metric_samples(request(s, "GET", "/metrics")[2])
    finally:
        served.engine.stop()
    # the first request's 4 sequences find empty slots, each later one all but the last token cached
    assert samples["gpt2repro_prompt_tokens_total"] == 3 * 4 * 8
    assert samples["gpt2repro_prompt_tokens_cached_total"] == 2 * 4 * 7
