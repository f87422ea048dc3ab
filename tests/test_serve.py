"""`gpt2repro serve`: a real server on 127.0.0.1 (a port the system picks), driven by the official
`openai` client and by raw HTTP for the requests that client would refuse to send."""

from __future__ import annotations

import json
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from helpers import assert_one_line_error, launch

pytest.importorskip("starlette", reason="the serve extra (starlette, uvicorn) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (starlette, uvicorn) is not installed")
openai = pytest.importorskip("openai", reason="the dev extra's openai client is not installed")

from gpt2repro.generation.generate import generate  # noqa: E402
from gpt2repro.generation.sampling import GREEDY  # noqa: E402
from gpt2repro.serve.app import create_app  # noqa: E402
from gpt2repro.serve.run import ServerThread, served_model  # noqa: E402

pytestmark = pytest.mark.serial  # alone: bench serve's timings and the server's timing bounds

MODEL = "test-model"
SLOTS = 8
JSON_TYPE = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def model(run_dir):
    from gpt2repro.checkpoint.gathered import load_model

    return load_model(run_dir).eval()


@pytest.fixture(scope="module")
def server(model):
    served = served_model(model, MODEL, SLOTS)
    with ServerThread(create_app(served, max_tokens_limit=64)) as s:
        yield s
    served.engine.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(url: str, body, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def greedy(model, enc, prompt: str, n: int) -> str:
    ids = torch.tensor([enc.encode(prompt)])
    return enc.decode(generate(model, ids, n, sampling=GREEDY)[0, ids.size(1) :].tolist())


def test_models_and_a_greedy_completion_equal_the_model_alone(client, model, enc):
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = client.completions.create(model=MODEL, prompt="To be, or not", max_tokens=12, temperature=0)
    assert r.choices[0].text == greedy(model, enc, "To be, or not", 12)
    assert r.choices[0].finish_reason == "length"
    ids = enc.encode("To be, or not")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        len(ids),
        12,
        len(ids) + 12,
    )
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text


def test_streamed_and_not_give_the_same_seeded_samples_for_each_of_n(client):
    kw = dict(model=MODEL, prompt="The king", max_tokens=10, temperature=1.0, top_p=0.9, n=3, seed=7)
    whole = client.completions.create(**kw)
    again = client.completions.create(**kw)
    texts = [c.text for c in sorted(whole.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1  # each choice draws with its own generator
    assert whole.usage.completion_tokens == 30
    streamed, finish, usage = ["", "", ""], {}, None
    for chunk in client.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            streamed[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
        usage = chunk.usage or usage
    assert streamed == texts and finish == {0: "length", 1: "length", 2: "length"}
    assert usage.completion_tokens == 30 and usage.prompt_tokens == 2
    other = client.completions.create(**{**kw, "seed": 8})
    assert [c.text for c in sorted(other.choices, key=lambda c: c.index)] != texts


def test_stop_cuts_the_text_before_the_stop_string(client, model, enc):
    full = greedy(model, enc, "ROMEO:", 24)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop and stop in full
    expected = full[: full.index(stop)]
    r = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=24, temperature=0, stop=[stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="ROMEO:", max_tokens=24, temperature=0, stop=stop, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_echo_and_logprobs_are_the_models_own_log_probabilities(client, model, enc):
    prompt = "First Citizen: we are"
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=5, temperature=0, echo=True, logprobs=3
    )
    lp, text = r.choices[0].logprobs, r.choices[0].text
    ids = enc.encode(prompt) + enc.encode(text[len(prompt) :])
    assert text.startswith(prompt) and len(lp.tokens) == len(ids) == len(enc.encode(prompt)) + 5
    assert lp.tokens == [enc.decode([t]) for t in ids]
    with torch.no_grad():
        own = torch.log_softmax(model(torch.tensor([ids]))[0][0].float(), -1)
    expected = own[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    for pos in range(1, len(ids)):
        top = own[pos - 1].topk(3)
        assert list(lp.top_logprobs[pos].values()) == pytest.approx(top.values.tolist(), abs=1e-4)
        assert list(lp.top_logprobs[pos]) == [enc.decode([t]) for t in top.indices.tolist()]
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(ids))]
    scored = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    assert scored.choices[0].text == prompt and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs == pytest.approx(
        lp.token_logprobs[: len(enc.encode(prompt))], abs=1e-4
    )


def test_chat_to_a_base_model_is_a_400_naming_the_missing_template(client):
    with pytest.raises(openai.BadRequestError, match="no chat template") as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["param"] == "model" and e.value.body["type"] == "invalid_request_error"


BAD = [  # (path, body, status, param)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"prompt": "a"}, 400, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": MODEL, "prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 99999999]}, 400, "prompt"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "a"}, 404, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 10_000}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 65}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "stop": [1]}, 400, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "logprobs": 99}, 400, "logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
]
A = {"model": MODEL, "prompt": "a", "max_tokens": 2}
# OpenAI parameters: checked as OpenAI ranges them, or refused when they would change the output
# and are not implemented (never ignored)
BAD += [("/v1/completions", {**A, **extra}, 400, param) for extra, param in [
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"logit_bias": {"50257": 1}}, "logit_bias"),  # past the base model's vocabulary
    ({"logit_bias": {"50": 100.5}}, "logit_bias"),
    ({"logit_bias": {"50": "1"}}, "logit_bias"),
    ({"logit_bias": [50]}, "logit_bias"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"best_of": 2}, "best_of"),
    ({"suffix": " end"}, "suffix"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"repetition_penalty": 1.2}, "repetition_penalty"),
    ({"logit_bias": {"050": 1, "50": -1}}, "logit_bias"),  # one token twice: which bias would win?
    ({"use_beam_search": True}, "use_beam_search"),
    ({"repeat_penalty": 1.1}, "repeat_penalty"),
    ({"n_probs": 3}, "n_probs"),
]]  # fmt: skip
BAD += [("/v1/completions", b'{"model": "%s", "prompt": "a", "logit_bias": {"50": %s}}' % (MODEL.encode(), v),
         400, "logit_bias") for v in (b"1e999", b"-1e999", b"NaN")]  # fmt: skip


def _openai_spelling(data: bytes) -> str:
    """OpenAI's legacy logprobs: a token's text, or its bytes escaped when they are not text alone."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def test_top_logprobs_keep_every_alternative_when_tokens_share_no_text_of_their_own(run_dir, enc):
    """Lone UTF-8 byte tokens all decode to U+FFFD alone: keyed by that text, a less likely one
    overwrote a more likely one. N alternatives give N entries, each with its own log-probability
    (the model here favours the tokens that are parts of characters, so they crowd the top 5)."""
    from gpt2repro.checkpoint.gathered import load_model

    model = load_model(run_dir).eval()
    parts = torch.tensor([_openai_spelling(enc.decode_single_token_bytes(t)).startswith("bytes:")
                          for t in range(model.config.vocab_size)])  # fmt: skip
    real = model.logits
    model.logits = lambda h: real(h) + 6.0 * parts.to(h.dtype)
    prompt = "日本語のテキスト"
    served = served_model(model, MODEL, 1)
    try:
        with ServerThread(create_app(served)) as s:
            client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=5)
    finally:
        served.engine.stop()
    lp = r.choices[0].logprobs
    ids = enc.encode(prompt)
    spelled = [_openai_spelling(enc.decode_single_token_bytes(t)) for t in ids]
    assert any(t.startswith("bytes:") for t in spelled)  # the case at hand: parts of characters
    assert lp.tokens == spelled
    with torch.no_grad():
        own = torch.log_softmax(model.logits(model.hidden(torch.tensor([ids]))[0]).double(), -1)
    for pos in range(1, len(ids)):
        top = own[pos - 1].topk(5)
        expected = {_openai_spelling(enc.decode_single_token_bytes(t)): v
                    for t, v in zip(top.indices.tolist(), top.values.tolist())}  # fmt: skip
        assert len(expected) == 5 and list(lp.top_logprobs[pos]) == list(expected)
        assert list(lp.top_logprobs[pos].values()) == pytest.approx(list(expected.values()), abs=1e-4)


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_requests_get_openais_error_json(server, path, body, status, param):
    code, answer = post(server.url + path, body)
    assert code == status
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["param"] == param and answer["error"]["message"]


def test_metadata_and_harmless_values_of_unsupported_parameters_are_accepted(server):
    for extra in ({"user": "u1", "metadata": {"k": "v"}, "store": False}, {"best_of": 1, "suffix": None},
                  {"response_format": {"type": "text"}, "tools": [], "logit_bias": {}}):  # fmt: skip
        code, answer = post(server.url + "/v1/completions", {**A, **extra})
        assert code == 200, answer


def _reference(
    model, ids: list[int], steps: int, logit_bias=None, presence_penalty=0.0, frequency_penalty=0.0
):
    """Greedy decoding with OpenAI's logit_bias and penalties, the model and the adjustments in float64,
    every step recomputed from the whole sequence."""
    import copy

    from gpt2repro.generation.sampling import ends_reply

    model64 = copy.deepcopy(model).double()
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model64(torch.tensor([ids + out]))[0][0, -1].double()
            for token, bias in (logit_bias or {}).items():
                logits[int(token)] += bias
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).double()
            logits -= presence_penalty * (counts > 0).double() + frequency_penalty * counts
            token = int(logits.argmax())
            if ends_reply(token):
                break
            out.append(token)
    return out


def test_logit_bias_and_penalties_follow_openai_against_a_float64_reference(client, model, enc):
    prompt = "First Citizen:"
    ids = enc.encode(prompt)
    plain = _reference(model, ids, 16)
    cases = [
        {"logit_bias": {str(plain[0]): -100, str(enc.encode(" and")[0]): 3.5}},
        {"frequency_penalty": 2.0},
        {"presence_penalty": 2.0},
        {"presence_penalty": 1.0, "frequency_penalty": -0.5, "logit_bias": {"11": 1.5}},
    ]
    for extra in cases:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, **extra)
        expected = _reference(model, ids, 16, **extra)
        assert expected != plain, extra  # each case changes the greedy text
        assert r.choices[0].text == enc.decode(expected), extra
    # applied per sequence in the batched engine: each of n choices as it is drawn alone
    extra = {"frequency_penalty": 1.5, "presence_penalty": 0.5, "logit_bias": {"13": 4}}
    batched = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, n=3, seed=7, **extra)
    for i, choice in enumerate(sorted(batched.choices, key=lambda c: c.index)):
        alone = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, seed=7 + i, **extra)
        assert choice.text == alone.choices[0].text


@pytest.mark.parametrize("chunked", [False, True])
def test_an_oversized_body_is_a_413_before_it_is_all_read(server, chunked):
    """Refused by its Content-Length, or while a chunked body (no length) streams in."""
    import http.client

    body = b'{"model": "x", "prompt": "' + b"a" * (2 << 20) + b'"}'
    conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
    try:
        parts = (body[i : i + 65536] for i in range(0, len(body), 65536))
        conn.request(
            "POST", "/v1/completions", parts if chunked else body, encode_chunked=chunked, headers=JSON_TYPE
        )
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed before taking it all
    r = conn.getresponse()
    answer = json.loads(r.read())
    assert r.status == 413 and answer["error"]["code"] == "request_too_large"
    conn.close()


def test_unknown_routes_and_methods_are_json_errors_too(server):
    code, answer = post(server.url + "/v1/embeddings", {})
    assert code == 404 and "error" in answer
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server.url + "/v1/completions", timeout=10)
    assert e.value.code == 405 and "error" in json.loads(e.value.read())


def test_an_api_key_is_required_when_set(model):
    served = served_model(model, MODEL, 2)
    try:
        with ServerThread(create_app(served, api_key="s3cret")) as s:
            body = {"model": MODEL, "prompt": "a", "max_tokens": 1}
            assert post(s.url + "/v1/completions", body)[0] == 401
            code, answer = post(s.url + "/v1/completions", body, {"Authorization": "Bearer wrong"})
            assert code == 401 and answer["error"]["code"] == "invalid_api_key"
            assert post(s.url + "/v1/completions", body, {"Authorization": "Bearer s3cret"})[0] == 200
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0).models.list()
            good = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
            assert good.models.list().data[0].id == MODEL
    finally:
        served.engine.stop()


def test_sixteen_concurrent_clients_each_get_what_they_get_alone(client, model, enc):
    """16 clients against 8 slots: half queue; greedy equals the model alone, a seeded sample equals
    the same request served by itself."""
    prompts = [f"{word} of the" for word in ("KING", "Nurse", "Friar", "ROMEO")] * 4
    requests = [
        dict(model=MODEL, prompt=p, max_tokens=6 + i % 5, temperature=0 if i % 2 else 0.8, seed=i)
        for i, p in enumerate(prompts)
    ]
    alone = [client.completions.create(**r).choices[0].text for r in requests]
    together: list[str | None] = [None] * len(requests)

    def one(i):
        together[i] = client.completions.create(**requests[i]).choices[0].text

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert together == alone
    for i in range(1, len(requests), 2):
        assert alone[i] == greedy(model, enc, prompts[i], requests[i]["max_tokens"])


def _health(server) -> dict:
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        return json.loads(r.read())


def test_a_client_that_disconnects_mid_stream_frees_its_slot(model):
    """Decoding slowed to 20 ms a step: 64 tokens would take over a second, the client leaves after
    the first; its sequence stops early and its slot is free."""
    served = served_model(model, MODEL, 2)
    decode, steps = served.engine._decode, []

    def slow_decode():
        steps.append(served.engine.running[0].generated)
        time.sleep(0.02)
        decode()

    served.engine._decode = slow_decode
    body = {"model": MODEL, "prompt": "a", "max_tokens": 64, "stream": True}
    try:
        with ServerThread(create_app(served)) as s:
            req = urllib.request.Request(
                s.url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            r = urllib.request.urlopen(req, timeout=60)
            assert r.readline().startswith(b"data: {")
            r.close()  # gone mid-stream
            deadline = time.monotonic() + 20
            while _health(s)["running"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _health(s) == {"status": "ok", "running": 0, "waiting": 0, "slots": 2}
            assert 0 < len(steps) < 40  # stopped well before its 64 tokens
    finally:
        served.engine.stop()


def test_serve_without_the_extra_or_with_bad_numbers_is_one_line(monkeypatch, capsys, run_dir):
    argv = ["serve", "--checkpoint", run_dir]
    assert_one_line_error(capsys, [*argv, "--max-concurrency", "0"], "--max-concurrency must be at least 1")
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    assert_one_line_error(capsys, argv, "pip install 'gpt2repro[serve]'")


@pytest.mark.slow
def test_sigterm_lets_an_in_flight_stream_finish_then_exits(run_dir):
    """`gpt2repro serve` in a subprocess: SIGTERM during a stream; the stream still ends with
    [DONE], new connections are refused, the process exits 0."""
    proc = launch("serve", "--checkpoint", run_dir, "--port", "0")
    try:
        url = None
        for line in proc.stdout:
            found = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
            if found:
                url = found.group(1)
                break
        assert url, "the server did not say where it listens"
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
        body = {
            "model": run_dir.name,
            "prompt": "a",
            "max_tokens": 200,
            "stream": True,
            "logit_bias": {"50256": -100},
        }
        # (no <|endoftext|>: the stream runs until SIGTERM has arrived, whatever this tiny model draws)
        req = urllib.request.Request(
            url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.readline().startswith(b"data: {")
            proc.send_signal(signal.SIGTERM)
            rest = r.read().decode()
        assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason": "length"' in rest
        assert proc.wait(timeout=60) == 0
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(url + "/health", timeout=5)
    finally:
        proc.kill()
        proc.wait()


def test_chat_completions_through_a_chat_format_streamed_and_not(model, enc):
    """A stand-in chat format (messages' text in turn) in place of a chat model's template: the
    messages reach the model, streamed and whole replies agree."""
    from gpt2repro.serve.run import ChatFormat

    render = lambda messages: enc.encode("".join(f"{m['role']}: {m['content']}\n" for m in messages))  # noqa: E731
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"}]
    prompt = torch.tensor([render(messages)])
    expected = generate(model, prompt, 30, sampling=GREEDY)[0, prompt.size(1) :].tolist()
    served = served_model(model, "chat-model", 4)
    served.chat = ChatFormat(render, enc.decode_single_token_bytes)
    try:
        with ServerThread(create_app(served)) as s:
            client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
            r = client.chat.completions.create(
                model="chat-model", messages=messages, max_tokens=30, temperature=0
            )
            chunks = list(
                client.chat.completions.create(
                    model="chat-model", messages=messages, max_tokens=30, temperature=0, stream=True
                )
            )
    finally:
        served.engine.stop()
    assert r.choices[0].message.content == enc.decode(expected)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == prompt.size(1) and r.usage.completion_tokens == len(expected)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_bench_serve_measures_batched_against_one_at_a_time(monkeypatch):
    """Batched, eager and compiled (int8, the CPU's fastest; fp32's compiled server is int8's with
    another kernel), against one at a time; a small model: compiling is most of the time here."""
    from gpt2repro.bench import common
    from gpt2repro.bench.serving import SERVERS, bench_serve

    monkeypatch.setitem(common.SIZES, "2x64", (2, 64, 2, 1, 256))
    servers = [s for s in SERVERS if not (s[3] and s[2] == "fp32")]
    rows = bench_serve("2x64", 1, torch.device("cpu"), requests=4, new_tokens=3, servers=servers)
    assert [(r["server"], r["weights"], r["clients"]) for r in rows] == [
        (server, weights, c) for _, server, weights, _ in servers for c in (1, 4, 16)
    ]
    assert {r["weights"] for r in rows} == {"fp32", "int8"} and len(rows) == 9
    for r in rows:  # every request generated its 3 tokens
        assert r["gen tok/s"] == pytest.approx(3 * r["req/s"], rel=0.05)


def test_a_chat_model_answers_through_its_own_template(chat_run_dir):
    """The tiny chat model of conftest (taught to answer "Hi" with "Hello there."), served: the
    messages go through chat.render, the reply stops at <|assistant_end|> (not part of it), the same
    as `gpt2repro chat` gives alone; the page's /v1/models says it is a chat model."""
    from gpt2repro.checkpoint.gathered import load_model
    from gpt2repro.generation.sampling import ends_reply
    from gpt2repro.text import chat

    model = load_model(chat_run_dir).eval()
    messages = [{"role": "user", "content": "Hi"}]
    prompt = torch.tensor([chat.render(messages, add_generation_prompt=True)])
    alone = generate(model, prompt, 16, sampling=GREEDY)[0, prompt.size(1) :].tolist()
    end = next(i for i, t in enumerate(alone) if ends_reply(t))
    served = served_model(model, "chat-model", 2)
    try:
        with ServerThread(create_app(served)) as s:
            client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
            r = client.chat.completions.create(
                model="chat-model", messages=messages, max_tokens=16, temperature=0
            )
            listed = post_get(s.url + "/v1/models")
    finally:
        served.engine.stop()
    assert r.choices[0].message.content == chat.encoding().decode(alone[:end]) == "Hello there."
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == end + 1
    assert listed["data"][0]["chat"] is True


def post_get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_bench_serve_reports_each_turns_first_token_latency_with_and_without_prefix_caching():
    from gpt2repro.bench.serving import TURNS, bench_serve_turns

    rows = bench_serve_turns("4x256", 1, torch.device("cpu"))
    assert [(r["server"], r["turn"]) for r in rows] == [
        (server, t) for server in ("prefix cache", "no prefix cache") for t in range(1, TURNS + 1)
    ]
    prompts = [r["prompt tokens"] for r in rows[:TURNS]]
    assert prompts == sorted(set(prompts)) and prompts == [r["prompt tokens"] for r in rows[TURNS:]]
    assert all(r["first token ms"] > 0 for r in rows)


def test_the_served_model_decodes_with_its_weights_laid_out_for_it(run_dir):
    """`served_model` prepares the model for decoding (`decoding.prepare`): where the transposed
    layout measures fastest, its weights are stored so (ties kept) and the engine's steps use it."""
    from unittest import mock

    from gpt2repro.checkpoint.gathered import load_model
    from gpt2repro.generation import decoding, kernels

    fresh = load_model(run_dir).eval()
    assert fresh.lm_head.weight.is_contiguous()
    with mock.patch.object(decoding, "choose", return_value=kernels.COLUMNS):
        served = served_model(fresh, MODEL, 1)
    served.engine.stop()
    head = fresh.lm_head.weight
    assert head.stride() == (1, head.size(0)) and head is fresh.transformer.wte.weight
    assert served.engine.step.kernel is kernels.COLUMNS
