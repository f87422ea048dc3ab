"""`gpt2repro bench`: measured speed, never timed tests.

Every sub-command prints a table and writes JSON (medians over several runs after warm-up, machine
info, torch version, threads). Yardsticks run the same config side by side: a plain nanoGPT-style
model written here (straightforward PyTorch, no tricks), Hugging Face's GPT2LMHeadModel, the
original one-example-at-a-time HellaSwag loop, a single-process tokenizer.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig

# Dense bf16 tensor-core peaks (FLOP/s) for MFU on GPUs; CPUs are measured instead.
GPU_PEAKS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L4": 121e12,
    "4090": 165e12,
    "3090": 71e12,
}
SIZES = {  # name: (n_layer, n_embd, n_head, B, T)
    "tiny": (4, 256, 4, 8, 256),
    "small": (6, 384, 6, 8, 256),
    "124m": (12, 768, 12, 1, 1024),
}
TRAIN_MODES = ("eager", "bf16", "compile", "compile-bf16")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_flops(
    dtype: torch.dtype, n: int = 1024, repeats: int = 5, device: str = "cpu", best: bool = False
) -> float:
    """FLOP/s of an n x n x n matmul, median (or best) of `repeats`: the MFU denominator on CPUs."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)

    def run():
        for _ in range(4):
            a @ b
        _sync(torch.device(device))

    if best:
        run()
        return max(4 * 2 * n**3 / _median_time(run, 1, warmup=0) for _ in range(repeats))
    return 4 * 2 * n**3 / _median_time(run, repeats)


@functools.lru_cache(maxsize=8)
def device_peak_flops(device: torch.device, dtype: str) -> float | None:
    """Peak FLOP/s for MFU: a table for known GPUs, a quick GEMM measurement on CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peak for key, peak in GPU_PEAKS.items() if key in name), None)
    if device.type == "cpu":
        # the best of several runs: a peak, robust to a busy moment during the measurement
        return gemm_flops(torch.bfloat16 if dtype == "bf16" else torch.float32, repeats=7, best=True)
    return None


def machine_info() -> dict:
    return {
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ---------------------------------------------------------------- the plain reference model


class RefBlock(nn.Module):
    """nanoGPT's block, as written in the lecture: no fused loss, nothing clever."""

    def __init__(self, d: int, h: int):
        super().__init__()
        self.h = h
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class RefGPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(RefBlock(cfg.n_embd, cfg.n_head) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


class HFWrapper(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        hf_cfg = GPT2Config(
            n_layer=cfg.n_layer,
            n_embd=cfg.n_embd,
            n_head=cfg.n_head,
            n_positions=cfg.block_size,
            vocab_size=cfg.padded_vocab_size,
            attn_pdrop=0.0,
            embd_pdrop=0.0,
            resid_pdrop=0.0,
            attn_implementation="sdpa",
        )
        self.model = GPT2LMHeadModel(hf_cfg)

    def forward(self, idx, targets):
        out = self.model(input_ids=idx, labels=targets)
        return out.logits, out.loss


def size_config(size: str) -> tuple[GPTConfig, int, int]:
    L, d, h, B, T = SIZES[size]
    return (
        GPTConfig(n_layer=L, n_embd=d, n_head=h, block_size=max(T, 256), vocab_size=50257, vocab_multiple=64),
        B,
        T,
    )


def bench_train_step(impl: str, size: str, mode: str, repeats: int, device: torch.device) -> dict:
    """Tokens/s of forward + backward + AdamW for one model implementation in one mode."""
    from .model import GPT

    cfg, B, T = size_config(size)
    torch.manual_seed(0)
    model = {"ours": GPT, "reference": RefGPT, "hf": HFWrapper}[impl](cfg).to(device)
    with torch.device("meta"):  # the same FLOP count for every implementation, no weights allocated
        flops_per_token = GPT(cfg).flops_per_token(T)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=impl == "ours" or device.type == "cuda")
    step_model = torch.compile(model) if mode.startswith("compile") else model
    use_bf16 = mode.endswith("bf16")
    x = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    y = torch.randint(0, cfg.vocab_size, (B, T), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            _, loss = step_model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)

    dt = _median_time(step, repeats, warmup=3 if mode.startswith("compile") else 1)
    tok_s = B * T / dt
    peak = device_peak_flops(device, "bf16" if use_bf16 else "fp32")
    return {
        "impl": impl,
        "size": size,
        "mode": mode,
        "B": B,
        "T": T,
        "step_s": dt,
        "tok_per_s": tok_s,
        "mfu": flops_per_token * tok_s / peak if peak else None,
    }


def bench_generate(size: str, repeats: int, device: torch.device, new_tokens: int = 256) -> list[dict]:
    """Greedy decoding of new_tokens from an 8-token prompt: our KV cache (fp32 and bf16 weights)
    against recomputing the whole sequence for every token (ours: the lm_head at the last position
    only; original: build-nanogpt's loop, the full forward) and transformers' generate, the same
    weights."""
    import copy

    from .generate import generate
    from .model import GPT

    cfg, _, _ = size_config(size)
    cfg.block_size = 512
    torch.manual_seed(0)
    model = GPT(cfg).to(device).eval()
    ours = {"fp32": model, "bf16": copy.deepcopy(model).to(torch.bfloat16)}
    hf = {}
    try:
        hf["fp32"] = _hf_copy(model)
        hf["bf16"] = copy.deepcopy(hf["fp32"]).to(torch.bfloat16)
    except ImportError:
        pass

    def runner(method: str, dtype: str, prompt: torch.Tensor):
        if method == "original":
            return lambda: _original_generate(ours[dtype], prompt, new_tokens)
        if method == "hf":
            return lambda: hf[dtype].generate(
                prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
            )
        return lambda: generate(
            ours[dtype], prompt, new_tokens, temperature=0, use_cache=method == "kv-cache"
        )

    rows = []
    for batch in (1, 8):
        prompt = torch.randint(0, cfg.vocab_size, (batch, 8), device=device)
        for method in ("kv-cache", "recompute", "original", "hf"):
            for dtype in ("fp32", "bf16"):
                if (method == "hf" and not hf) or (method == "original" and batch > 1):
                    continue  # the original loop at B=8 takes minutes per run
                with torch.no_grad():
                    dt = _median_time(runner(method, dtype, prompt), repeats)
                rows.append(
                    {
                        "method": method,
                        "dtype": dtype,
                        "batch": batch,
                        "new_tokens": new_tokens,
                        "s": dt,
                        "tok_per_s": batch * new_tokens / dt,
                    }
                )
    return rows


def _original_generate(model, idx: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """build-nanogpt's sampling loop, greedy: the full forward over the whole sequence per token."""
    for _ in range(new_tokens):
        logits, _ = model(idx)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def _hf_copy(model):
    from transformers import GPT2LMHeadModel

    from .hf import export_hf

    with tempfile.TemporaryDirectory() as d:
        out = export_hf(model, Path(d) / "m")
        return GPT2LMHeadModel.from_pretrained(out, attn_implementation="sdpa").eval()


def hellaswag_one_at_a_time(model, examples: list[dict], dtype: str = "fp32") -> list[int]:
    """The original build-nanogpt method: one example per forward, full logits, per-token losses
    (fp32 as in its hellaswag.py; bf16 autocast as in its training loop)."""
    from .evals.hellaswag import render

    preds = []
    for ex in examples:
        r = render(ex, "completion")
        rows = [r.context + e for e in r.endings]
        width = max(len(t) for t in rows)
        tokens = torch.zeros(4, width, dtype=torch.long)
        mask = torch.zeros(4, width)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = torch.tensor(row)
            mask[i, len(r.context) : len(row)] = 1
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            logits = model(tokens)[0]
        losses = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none"
        ).view(4, -1)
        shift_mask = mask[:, 1:]
        avg = (losses * shift_mask).sum(1) / shift_mask.sum(1)
        preds.append(int(avg.argmin()))
    return preds


def hellaswag_flop_ratio(model, examples: list[dict]) -> float:
    """Forward FLOPs of the one-at-a-time method over ours: the speed-up either reaches at equal
    arithmetic efficiency. Counts the transformer body (2 x its weights per token) and the lm_head
    (2 x n_embd x vocab per position it is applied to); attention and our row padding are left out."""
    from .evals.hellaswag import render

    cfg = model.config
    body = 2 * (
        model.num_params() - model.transformer.wte.weight.numel() - model.transformer.wpe.weight.numel()
    )
    head = 2 * cfg.n_embd * cfg.vocab_size
    theirs = ours = 0
    for ex in examples:
        r = render(ex, "completion")
        width = len(r.context) + max(len(e) for e in r.endings)
        scored = sum(len(e) for e in r.endings)
        theirs += 4 * width * (body + head)
        ours += (len(r.context) + scored) * body + scored * head
    return theirs / ours


def bench_hellaswag(size: str, repeats: int, n_examples: int = 200) -> list[dict]:
    """Our evaluator against the original one-example-at-a-time loop, each in fp32 and bf16 autocast,
    on the same model and examples. fp32 predictions must be identical; the others report their
    agreement with the fp32 original."""
    from .evals import hellaswag
    from .model import GPT

    cfg, _, _ = size_config(size)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    examples = hellaswag.load_examples(limit=n_examples)

    def ours(dtype: str) -> list[int]:
        details: list[dict] = []
        hellaswag.evaluate(model, examples, "completion", dtype=dtype, details=details)
        return [d["pred_norm"] for d in sorted(details, key=lambda d: d["index"])]

    def original(dtype: str) -> list[int]:
        return hellaswag_one_at_a_time(model, examples, dtype)

    methods = (("batched", ours, repeats), ("one-at-a-time", original, max(1, repeats // 2)))
    dtypes = ("fp32", "bf16")
    preds = {(method, d): run(d) for method, run, _ in methods for d in dtypes}  # also the warm-up runs
    reference = preds["one-at-a-time", "fp32"]
    if preds["batched", "fp32"] != reference:
        raise RuntimeError("batched and one-at-a-time HellaSwag predictions differ")
    rows = []
    for method, run, runs in methods:
        for dtype in dtypes:
            agree = sum(a == b for a, b in zip(preds[method, dtype], reference)) / n_examples
            t = _median_time(lambda r=run, d=dtype: r(d), runs, warmup=0)
            rows.append(
                {
                    "method": method,
                    "dtype": dtype,
                    "examples": n_examples,
                    "s": t,
                    "examples_per_s": n_examples / t,
                    "same_predictions": agree,
                }
            )
    base = {r["dtype"]: r["examples_per_s"] for r in rows if r["method"] == "one-at-a-time"}
    flop_ratio = hellaswag_flop_ratio(model, examples)
    for r in rows:
        r["speedup"] = r["examples_per_s"] / base["fp32"]
        r["speedup_same_dtype"] = r["examples_per_s"] / base[r["dtype"]]
        r["flop_ratio"] = flop_ratio if r["method"] == "batched" else 1.0
    return rows


def bench_prepare(repeats: int) -> list[dict]:
    """Tokenization throughput with all cores vs one, on the same documents (WikiText-2 lines as documents)."""
    from . import assets
    from .data.prepare import prepare

    mirror = assets.mirror_dir()
    sources = [mirror / "wikitext-2" / "valid.txt", mirror / "wikitext-2" / "test.txt"] if mirror else []
    if not sources or not all(p.is_file() for p in sources):
        sources = [assets.fetch("tinyshakespeare.txt")]
    docs = [
        line for src in sources for line in Path(src).read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "docs.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs * 16))
        counts = tuple(dict.fromkeys((os.cpu_count() or 1, 1)))
        times: dict[int, list[float]] = {w: [] for w in counts}
        tokens = 0
        for i in range(repeats + 1):  # interleaved, so a slow moment hits both; the first is warm-up
            for workers in counts:
                t0 = time.perf_counter()
                out = Path(tempfile.mkdtemp(dir=d))
                tokens = prepare([str(src)], out, workers=workers, progress=False)["total_tokens"]
                if i:
                    times[workers].append(time.perf_counter() - t0)
        for workers in counts:
            dt = statistics.median(times[workers])
            rows.append(
                {
                    "workers": workers,
                    "documents": len(docs) * 16,
                    "tokens": tokens,
                    "s": dt,
                    "tok_per_s": tokens / dt,
                    "speedup": statistics.median(times[1]) / dt,
                }
            )
    return rows


# ---------------------------------------------------------------- command


def _table(rows: list[dict]) -> str:
    keys = list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    widths = {k: max(len(k), *(len(fmt(r.get(k))) for r in rows)) for k in keys}
    lines = ["  ".join(k.ljust(widths[k]) for k in keys)]
    lines += ["  ".join(fmt(r.get(k)).ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def run(args) -> dict:
    from .distributed import pick_device

    device = pick_device("cuda" if torch.cuda.is_available() else "cpu")
    rows: list[dict]
    if args.what == "peak":
        rows = [
            {"dtype": name, "n": n, "gflop_per_s": gemm_flops(dt, n, args.repeats, device.type) / 1e9}
            for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))
            for n in (1024, 2048)
        ]
    elif args.what == "train":
        modes = TRAIN_MODES if args.mode == "all" else tuple(args.mode.split(","))
        impls = ["ours"] + {"none": [], "reference": ["reference"], "hf": ["hf"], "all": ["reference", "hf"]}[
            args.baseline
        ]
        rows = [
            bench_train_step(impl, args.size, mode, args.repeats, device) for impl in impls for mode in modes
        ]
        best = {impl: max(r["tok_per_s"] for r in rows if r["impl"] == impl) for impl in impls}
        for r in rows:
            r["vs_best_ours"] = r["tok_per_s"] / best["ours"]
    elif args.what == "generate":
        rows = bench_generate(args.size, args.repeats, device)
    elif args.what == "hellaswag":
        rows = bench_hellaswag(args.size, args.repeats)
    else:
        rows = bench_prepare(args.repeats)
    print(_table(rows))
    result = {
        "bench": args.what,
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "machine": machine_info(),
        "results": rows,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return result
