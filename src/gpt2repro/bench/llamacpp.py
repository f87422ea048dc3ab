"""Batch-1 decoding against llama.cpp (through llama-cpp-python), the same weights side by side:
ours in fp32, bf16 and int8 (eager, and with the one-token steps compiled), llama.cpp on our GGUF
export in f32, f16 and q8_0, each with the same threads. `greedy_as_ours`: an engine's greedy tokens
are our eager engine's in its dtype class. `of_bandwidth`: the matrices' bytes read per token times
tokens/s, as a fraction of the memory's read bandwidth (`common.read_bandwidth`), batch-1 decoding's
roofline.

Prompt processing and decoding are timed apart, the same way for both engines: a run that reads the
prompt and picks one token, and a run that goes on for `new_tokens` more; decoding is the difference.
Greedy, so both engines do the same work whatever the weights."""

from __future__ import annotations

import copy
import itertools
import os
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ..generation.decoding import for_decoding
from ..generation.generate import generate
from ..generation.sampling import GREEDY
from ..interop.gguf_export import export_gguf
from ..model.gpt import GPT
from ..training.mfu import median_time
from .common import BenchError, bench_dtypes, read_bandwidth, size_config

PROMPT_TOKENS = 128
NEW_TOKENS = 128
GGUF_TYPE = {"fp32": "f32", "bf16": "f16", "int8": "q8_0"}  # llama.cpp's CPU kernels have f16, ours bf16
BYTES = {"fp32": 4, "f32": 4, "bf16": 2, "f16": 2, "int8": 1, "q8_0": 34 / 32}  # per weight (q8_0: a
# 2-byte scale per 32); ours' int8 scales, 4 bytes per output feature, are left out (<0.5%)


def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError:
        raise BenchError(
            "--baseline llama.cpp needs llama-cpp-python: pip install 'gpt2repro[gguf-check]' "
            "(builds llama.cpp from source)"
        ) from None
    return llama_cpp


def llama_greedy(llm, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding in llama.cpp from an empty context (no cached prefix reused), through
    llama-cpp-python's `generate`: the prompt in one batch, then one token per step, as our
    `generate` does."""
    llm.reset()
    steps = llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0)
    return list(itertools.islice(steps, new_tokens))


def _greedy(model: GPT, prompt: torch.Tensor, compiled: bool) -> Callable[[int], list[int]]:
    """Our greedy decoding of n new tokens, as `llama_greedy` returns them."""
    return lambda n: generate(model, prompt, n, sampling=GREEDY, compiled=compiled)[
        0, prompt.size(1) :
    ].tolist()


def _rates(runs: dict[tuple[str, str], Callable[[int], list[int]]], repeats: int) -> tuple[dict, dict]:
    """(prompt tokens/s, decoded tokens/s) per engine: the prompt and one token, then NEW_TOKENS
    more; and each engine's greedy tokens (from the warm-up, which also compiles). Every repeat runs
    every engine in turn, so a slow moment of the shared machine hits all of them rather than one
    engine's whole series."""
    short: dict = {k: [] for k in runs}
    long: dict = {k: [] for k in runs}
    tokens = {k: run(1 + NEW_TOKENS) for k, run in runs.items()}  # warm-up
    for _ in range(repeats):
        for k, run in runs.items():
            short[k].append(median_time(lambda r=run: r(1), 1, warmup=0))
            long[k].append(median_time(lambda r=run: r(1 + NEW_TOKENS), 1, warmup=0))
    rates = {}
    for k in runs:
        prefill = statistics.median(short[k])
        rates[k] = PROMPT_TOKENS / prefill, NEW_TOKENS / (statistics.median(long[k]) - prefill)
    return rates, tokens


def bench_llamacpp(size: str, repeats: int) -> list[dict]:
    """Rows for ours (fp32, bf16 where native, int8) and llama.cpp (f32, f16, q8_0) on one random model
    of `size`, all timed in alternation; each row notes the 1-minute load average after the runs."""
    llama_cpp = llama_cpp_module()
    cfg, _, _ = size_config(size)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    threads = torch.get_num_threads()
    prompt = torch.randint(0, cfg.vocab_size, (1, PROMPT_TOKENS))
    ids = prompt[0].tolist()
    engine = f"llama.cpp {llama_cpp.__version__}"
    runs, closers = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in (*bench_dtypes(), "int8"):
            ours = for_decoding(copy.deepcopy(model), dtype)  # as `sample` runs it
            runs["gpt2repro", dtype] = _greedy(ours, prompt, compiled=False)
            # as `sample --compile` runs it (fp32, bf16: laid out for the loop kernel, not the eager one's)
            fast = for_decoding(copy.deepcopy(model), dtype, compiled=True) if dtype != "int8" else ours
            runs["gpt2repro, compiled steps", dtype] = _greedy(fast, prompt, compiled=True)
            path = export_gguf(model, Path(tmp) / f"{GGUF_TYPE[dtype]}.gguf", GGUF_TYPE[dtype])
            llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=PROMPT_TOKENS + NEW_TOKENS + 8,
                n_batch=PROMPT_TOKENS,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
            )
            closers.append(llm.close)
            runs[engine, GGUF_TYPE[dtype]] = lambda n, llm=llm: llama_greedy(llm, ids, n)
        try:
            rates, tokens = _rates(runs, repeats)
        finally:
            for close in closers:
                close()
    load = os.getloadavg()[0]
    bandwidth = read_bandwidth(repeats, torch.device("cpu"))
    matrices = 12 * cfg.n_layer * cfg.n_embd**2 + cfg.vocab_size * cfg.n_embd  # the blocks', the lm_head
    eager = {GGUF_TYPE[w]: tokens["gpt2repro", w] for w in (*bench_dtypes(), "int8")}  # per dtype class
    return [
        {
            **_row(name, weights, threads, rate, load),
            "greedy_as_ours": tokens[name, weights] == eager[GGUF_TYPE.get(weights, weights)],
            "of_bandwidth": matrices * BYTES[weights] * rate[1] / bandwidth,
            "read_gb_per_s": bandwidth / 1e9,
        }
        for (name, weights), rate in rates.items()
    ]


def _row(engine: str, weights: str, threads: int, rates: tuple[float, float], load: float) -> dict:
    return {
        "engine": engine,
        "weights": weights,
        "threads": threads,
        "batch": 1,
        "prompt_tokens": PROMPT_TOKENS,
        "prompt_tok_per_s": rates[0],
        "new_tokens": NEW_TOKENS,
        "decode_tok_per_s": rates[1],
        "load_1min": load,
    }
