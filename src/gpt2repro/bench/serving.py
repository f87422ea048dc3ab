"""`bench serve`: requests/s and generated tokens/s of `gpt2repro serve` with 1, 4 and 16 concurrent
clients, the batching engine (16 slots) against one-at-a-time serving (1 slot), the same prompts and
greedy requests over HTTP on 127.0.0.1 (server and clients in this one process, as threads)."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import torch

from ..model import GPT
from ..serve.app import create_app
from ..serve.run import ServerThread, served_model
from .common import size_config

CLIENTS = (1, 4, 16)


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


def bench_serve(
    size: str, repeats: int, device: torch.device, requests: int = 16, new_tokens: int = 32
) -> list[dict]:
    cfg, _, _ = size_config(size)
    cfg.block_size = 256
    torch.manual_seed(0)
    model = GPT(cfg).to(device).eval()
    prompts = torch.randint(0, cfg.vocab_size, (requests, 16)).tolist()
    rows = []
    for slots, server in ((16, "batched (16 slots)"), (1, "one at a time")):
        served = served_model(model, "bench", slots)
        try:
            with ServerThread(create_app(served)) as s:
                _run_clients(s.url, prompts[:2], 2, 4)  # warm-up
                for clients in CLIENTS:
                    runs = sorted(_run_clients(s.url, prompts, clients, new_tokens) for _ in range(repeats))
                    dt, tokens = runs[len(runs) // 2]
                    rows.append({"server": server, "clients": clients, "requests": requests,
                                 "req/s": round(requests / dt, 2), "gen tok/s": round(tokens / dt, 1)})  # fmt: skip
        finally:
            served.engine.stop()
    return rows
