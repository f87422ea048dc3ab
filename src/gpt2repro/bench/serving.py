"""`bench serve`: requests/s and generated tokens/s of `gpt2repro serve` with 1, 4 and 16 concurrent
clients, the batching engine (16 slots; eager steps, and compiled ones in fp32 and, on a CPU, int8)
against one-at-a-time serving (1 slot), the same prompts and greedy requests over HTTP on 127.0.0.1
(server and clients in this one process, as threads); then the first-token latency of each turn of an
8-turn conversation re-sent whole every turn (as clients and the web page do), with prefix caching
and without."""

from __future__ import annotations

import copy
import json
import statistics
import threading
import time
import urllib.request

import torch

from ..generation.decoding import for_decoding
from ..model.gpt import GPT
from ..serve.app import create_app
from ..serve.run import ServerThread, served_model
from ..text.tokenizer import EOT_ID
from .common import size_config

CLIENTS = (1, 4, 16)
TURNS, TURN_WORDS, TURN_REPLY = 8, 12, 12  # 8 turns of ~12 + 12 tokens (+4 of the template) fit 256


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def _run_clients(url: str, prompts: list[list[int]], clients: int, new_tokens: int) -> tuple[float, int]:
    """Seconds for `clients` threads to get through every prompt, each taking the next one left; and
    the tokens generated."""
    todo, lock, generated = list(prompts), threading.Lock(), []

    def client():
        while True:
            with lock:
                if not todo:
                    return
                prompt = todo.pop()
            body = {"model": "bench", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0}
            generated.append(_post(url + "/v1/completions", body)["usage"]["completion_tokens"])

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, sum(generated)


SERVERS = (  # (slots, name, weights, compiled steps)
    (16, "batched (16 slots)", "fp32", False),
    (16, "batched, compiled steps", "fp32", True),
    (16, "batched, compiled steps", "int8", True),  # (on a CPU only)
    (1, "one at a time", "fp32", False),
)


def bench_serve(
    size: str, repeats: int, device: torch.device, requests: int = 16, new_tokens: int = 32, servers=SERVERS
) -> list[dict]:
    cfg, _, _ = size_config(size)
    cfg.block_size = 256
    torch.manual_seed(0)
    model = GPT(cfg).to(device).eval()
    with torch.no_grad():  # <|endoftext|> never the argmax: every request generates all its tokens
        model.transformer.wte.weight[EOT_ID:] = 0
    prompts = torch.randint(0, cfg.vocab_size, (requests, 16)).tolist()
    rows = []
    for slots, server, weights, compiled in servers:
        if weights == "int8" and device.type != "cpu":
            continue
        decoding_model = for_decoding(copy.deepcopy(model), weights, compiled)
        served = served_model(decoding_model, "bench", slots, compiled=compiled)  # compiled before it listens
        try:
            with ServerThread(create_app(served)) as s:
                _run_clients(s.url, prompts[:2], 2, 4)  # warm-up
                for clients in CLIENTS:
                    runs = sorted(_run_clients(s.url, prompts, clients, new_tokens) for _ in range(repeats))
                    dt, tokens = runs[len(runs) // 2]
                    rows.append({"server": server, "weights": weights, "clients": clients, "requests": requests,
                                 "req/s": round(requests / dt, 2), "gen tok/s": round(tokens / dt, 1)})  # fmt: skip
        finally:
            served.engine.stop()
    return rows


def _chat_turn(url: str, messages: list[dict]) -> tuple[float, str, int]:
    """Seconds to the first streamed token of a greedy reply, the reply, and its prompt's tokens."""
    body = {"model": "bench", "messages": messages, "max_tokens": TURN_REPLY, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})  # fmt: skip
    start, first, reply, prompt = time.perf_counter(), None, "", 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            first = first or time.perf_counter() - start
            chunk = json.loads(line[6:])
            reply += "".join(c["delta"].get("content", "") for c in chunk["choices"])
            prompt = (chunk.get("usage") or {}).get("prompt_tokens", prompt)
    return first, reply, prompt


def _conversation(url: str) -> list[tuple[int, float]]:
    """(prompt tokens, first-token seconds) of each turn, the whole conversation re-sent each time."""
    messages, out = [], []
    for i in range(TURNS):
        messages.append({"role": "user", "content": f"{i}: " + " ".join(["word"] * TURN_WORDS)})
        first, reply, prompt = _chat_turn(url, messages)
        messages.append({"role": "assistant", "content": reply})
        out.append((prompt, first))
    return out


def bench_serve_turns(size: str, repeats: int, device: torch.device) -> list[dict]:
    """Per turn, with and without prefix caching: the prompt's tokens and the median first-token
    latency over `repeats` conversations (interleaved between the two servers, after a warm-up), on a
    chat model of `size` with 256 positions (random weights; the special tokens never the argmax, so
    every reply has all its tokens)."""
    cfg = size_config(size)[0].as_chat()
    cfg.block_size = 256
    torch.manual_seed(0)
    model = GPT(cfg).to(device).eval()
    with torch.no_grad():
        model.transformer.wte.weight[EOT_ID:] = 0
    modes = {"prefix cache": True, "no prefix cache": False}
    runs: dict[str, list] = {name: [] for name in modes}
    servers = {name: served_model(model, "bench", 4, prefix_cache=on) for name, on in modes.items()}
    try:
        with (
            ServerThread(create_app(servers["prefix cache"])) as a,
            ServerThread(create_app(servers["no prefix cache"])) as b,
        ):
            urls = {"prefix cache": a.url, "no prefix cache": b.url}
            for _ in range(repeats + 1):  # the first, a warm-up
                for name, url in urls.items():
                    runs[name].append(_conversation(url))
    finally:
        for served in servers.values():
            served.engine.stop()
    return [{"server": name, "turn": t + 1, "prompt tokens": runs[name][1][t][0],
             "first token ms": round(1000 * statistics.median(r[t][1] for r in runs[name][1:]), 2)}
            for name in modes for t in range(TURNS)]  # fmt: skip
