"""Inference benchmarks: KV-cache decoding against recomputation, the original loop and transformers;
batched HellaSwag scoring against the original one-example-at-a-time loop."""

from __future__ import annotations

import copy

import torch

from ..evals import hellaswag
from ..generation.decoding import for_decoding, prepare
from ..generation.generate import generate
from ..generation.sampling import GREEDY
from ..model.gpt import GPT
from ..model.precision import torch_dtype
from ..training.mfu import median_time
from .common import bench_dtypes, size_config
from .reference import core_one_at_a_time, hellaswag_one_at_a_time, hf_copy, original_generate


def bench_generate(size: str, repeats: int, device: torch.device, new_tokens: int = 256) -> list[dict]:
    """Greedy decoding of new_tokens from an 8-token prompt: our KV cache (fp32 and bf16 weights; and
    int8 on a CPU) against recomputing the whole sequence for every token (ours: the lm_head at the
    last position only; original: build-nanogpt's loop, the full forward) and transformers'
    generate, the same weights."""
    cfg, _, _ = size_config(size)
    cfg.block_size = 512
    torch.manual_seed(0)
    model = GPT(cfg).to(device).eval()
    plain = {d: copy.deepcopy(model).to(torch_dtype(d)) for d in bench_dtypes()}  # nn.Linear's layout
    ours = {d: prepare(copy.deepcopy(m)) for d, m in plain.items()}  # as `sample` runs it
    if device.type == "cpu":  # int8 weights read by the int8 kernel, as `sample --weight-dtype int8`
        ours["int8"] = for_decoding(copy.deepcopy(model), "int8")
    hf = {}
    try:
        hf["fp32"] = hf_copy(model)
        hf.update({d: copy.deepcopy(hf["fp32"]).to(torch_dtype(d)) for d in bench_dtypes() if d != "fp32"})
    except ImportError:
        pass

    def runner(method: str, dtype: str, prompt: torch.Tensor):
        if method == "original":
            return lambda: original_generate(plain[dtype], prompt, new_tokens)  # its code, its layout
        if method == "hf":
            return lambda: hf[dtype].generate(
                prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
            )
        return lambda: generate(
            ours[dtype], prompt, new_tokens, sampling=GREEDY, use_cache=method == "kv-cache"
        )

    rows = []
    for batch in (1, 8):
        prompt = torch.randint(0, cfg.vocab_size, (batch, 8), device=device)
        for method in ("kv-cache", "recompute", "original", "hf"):
            for dtype in ours if method == "kv-cache" else bench_dtypes():
                if (method == "hf" and not hf) or (method == "original" and batch > 1):
                    continue  # the original loop at B=8 takes minutes per run
                with torch.no_grad():
                    dt = median_time(runner(method, dtype, prompt), repeats)
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


def hellaswag_flop_ratio(model, examples: list[dict]) -> float:
    """Forward FLOPs of the one-at-a-time method over ours: the speed-up either reaches at equal
    arithmetic efficiency. Counts the transformer body (2 x its weights per token) and the lm_head
    (2 x n_embd x vocab per position it is applied to); attention and our row padding are left out."""
    cfg = model.config
    body = 2 * (
        model.num_params() - model.transformer.wte.weight.numel() - model.transformer.wpe.weight.numel()
    )
    head = 2 * cfg.n_embd * cfg.vocab_size
    theirs = ours = 0
    for ex in examples:
        r = hellaswag.render(ex, "completion")
        width = len(r.context) + max(len(e) for e in r.endings)
        scored = sum(len(e) for e in r.endings)
        theirs += 4 * width * (body + head)
        ours += (len(r.context) + scored) * body + scored * head
    return theirs / ours


def bench_hellaswag(size: str, repeats: int, device: torch.device, n_examples: int = 200) -> list[dict]:
    """Our evaluator against the original one-example-at-a-time loop, each in fp32 and bf16 autocast,
    on the same model and examples. fp32 predictions must be identical; the others report their
    agreement with the fp32 original."""
    cfg, _, _ = size_config(size)
    torch.manual_seed(0)
    model = GPT(cfg).to(device).eval()
    examples = hellaswag.load_examples(limit=n_examples)

    def ours(dtype: str) -> list[int]:
        details: list[dict] = []
        hellaswag.evaluate(model, examples, "completion", device, dtype=dtype, details=details)
        return [d["pred_norm"] for d in sorted(details, key=lambda d: d["index"])]

    def original(dtype: str) -> list[int]:
        return hellaswag_one_at_a_time(model, examples, dtype, device)

    methods = (("batched", ours, repeats), ("one-at-a-time", original, max(1, repeats // 2)))
    dtypes = bench_dtypes()
    preds = {(method, d): run(d) for method, run, _ in methods for d in dtypes}  # also the warm-up runs
    reference = preds["one-at-a-time", "fp32"]
    if preds["batched", "fp32"] != reference:
        raise RuntimeError("batched and one-at-a-time HellaSwag predictions differ")
    rows = []
    for method, run, runs in methods:
        for dtype in dtypes:
            agree = sum(a == b for a, b in zip(preds[method, dtype], reference)) / n_examples
            t = median_time(lambda r=run, d=dtype: r(d), runs, warmup=0)
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


def core_bench_tasks(n_items: int) -> list:
    """CORE-shaped tasks from local data: HellaSwag validation rows as multiple choice, 0-shot and
    10-shot (CORE's hellaswag_zeroshot and hellaswag; fewer shots below 11 items), Tiny Shakespeare
    lines' last words as language modeling (LAMBADA's shape, 0-shot)."""
    from ..evals.core_data import Task
    from ..files import assets

    rows = hellaswag.load_examples(limit=n_items + 10)
    mc = [{"query": r["ctx"], "choices": r["endings"], "gold": r["label"]} for r in rows]
    lines = [ln.strip() for ln in assets.fetch("tinyshakespeare.txt").read_text().splitlines()]
    lm = [
        {"context": ln.rsplit(" ", 1)[0], "continuation": ln.rsplit(" ", 1)[1]}
        for ln in lines
        if len(ln.split()) >= 8
    ][:n_items]
    lines_of = list(range(1, n_items + 1))
    return [
        Task("hellaswag_zeroshot", "multiple_choice", 0, " ", 25.0, mc[:n_items], lines_of),
        Task("hellaswag", "multiple_choice", min(10, n_items - 1), " ", 25.0, mc[:n_items], lines_of),
        Task("lambada_like", "language_modeling", 0, " ", 0.0, lm, lines_of),
    ]


def bench_core(size: str, repeats: int, device: torch.device, n_items: int = 16) -> list[dict]:
    """Our batched CORE scorer against nanochat's one-item-at-a-time loop, on the same model and
    items (16 per task: 0- and 10-shot multiple choice, language modeling). The verdicts must agree."""
    from ..evals import core

    cfg, _, _ = size_config(size)
    cfg.block_size = 1024  # GPT-2's context: the 10-shot prompts fill it
    torch.manual_seed(0)
    model = GPT(cfg).to(device).eval()
    tasks = core_bench_tasks(n_items)
    prepared = {t.label: [core.prepare(t, i, cfg.block_size) for i in range(len(t.items))] for t in tasks}

    def batched(dtype: str) -> list[bool]:
        details: list[dict] = []
        for t in tasks:
            core.evaluate_task(model, t, device, dtype=dtype, details=details, prepared=prepared[t.label])
        return [d["correct"] for d in details]

    def one_at_a_time(dtype: str) -> list[bool]:
        return [v for t in tasks for v in core_one_at_a_time(model, t, prepared[t.label], dtype, device)]

    n = sum(len(t.items) for t in tasks)
    reference = one_at_a_time("fp32")
    if batched("fp32") != reference:
        raise RuntimeError("batched and one-at-a-time CORE verdicts differ")
    rows = []
    for method, run in (("batched", batched), ("one-at-a-time", one_at_a_time)):
        for dtype in bench_dtypes():
            verdicts = run(dtype)  # also the warm-up
            t = median_time(lambda r=run, d=dtype: r(d), repeats, warmup=0)
            same = sum(a == b for a, b in zip(verdicts, reference)) / n
            rows.append(
                {
                    "method": method,
                    "dtype": dtype,
                    "items": n,
                    "s": t,
                    "items_per_s": n / t,
                    "same_verdicts": same,
                }
            )
    base = {r["dtype"]: r["items_per_s"] for r in rows if r["method"] == "one-at-a-time"}
    for r in rows:
        r["speedup_same_dtype"] = r["items_per_s"] / base[r["dtype"]]
    return rows
