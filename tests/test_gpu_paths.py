"""The CUDA paths' logic, proven on CPU: compiled graphs without breaks, FSDP evaluating in the loop,
safe fp16, the lm_head at the padded width, the torch floor, honest MFU, ranks that agree on a
checkpoint, and the small CUDA-path settings. What only a GPU can show is in scripts/gpu_check.py,
whose CPU run is tested here too."""

import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    EVERY_RANK_REPORTS,
    SMALL,
    error_lines,
    events,
    losses,
    run_script,
    run_to_end,
    small_cfg,
    train_argv,
)
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import ROOT, shared_file
from gpt2repro.config.schema import model_config
from gpt2repro.model import precision
from gpt2repro.model.gpt import GPT
from gpt2repro.model.ops import linear_cross_entropy
from gpt2repro.training import mfu
from gpt2repro.training import train as tr


def _forward_loss(model):
    def f(x, y):
        return model(x, y)[1]

    return f


@pytest.mark.parametrize(
    "preset,autocast,every",
    [("cpu-tiny", None, 0), ("gpt2", None, 0), ("tiny", "bf16", 0), ("tiny", None, 1)],
)
def test_forward_and_loss_compile_to_one_graph(preset, autocast, every):
    """The fused loss is the one deliberate boundary (compiler.disable), at the very end: no break."""
    torch.manual_seed(0)
    with torch.device("meta") if preset == "gpt2" else torch.device("cpu"):
        model = GPT(model_config(preset, vocab_multiple=64))
    if preset == "gpt2":
        model = model.to_empty(device="cpu")
    model.recompute_interval = every
    x, y = torch.randint(0, 50257, (2, 64)), torch.randint(0, 50257, (2, 64))
    torch._dynamo.reset()
    with precision.autocast(torch.device("cpu"), autocast or "fp32"):
        explained = torch._dynamo.explain(_forward_loss(model))(x, y)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons[:3]


@pytest.mark.slow
def test_compiled_training_never_recompiles_after_its_first_steps_and_matches_eager(
    data_dir, tmp_path, monkeypatch
):
    import torch._dynamo.utils as dynamo_utils

    seen = []
    step = tr.Trainer.train_step

    def counting(self, s):
        out = step(self, s)
        seen.append(dynamo_utils.counters["frames"]["total"])
        return out

    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    overrides = ["max_steps=5", "val_every=1", "val_steps=1"]
    tr.train(small_cfg(*overrides, "compile=false"), data_dir, tmp_path / "eager")
    monkeypatch.setattr(tr.Trainer, "train_step", counting)
    tr.train(small_cfg(*overrides, "compile=true"), data_dir, tmp_path / "compiled")
    assert seen[0] > 0 and seen == [seen[0]] * 5  # train and eval frames compiled by step 0, never again
    breaks = dynamo_utils.counters["graph_break"]
    assert all("linear_cross_entropy" in reason for reason in breaks), list(breaks)[:2]
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(eager) == sorted(compiled) == list(range(5))
    for s in eager:
        assert compiled[s] == pytest.approx(eager[s], rel=1e-5)
    val = [events(tmp_path / run, "val") for run in ("eager", "compiled")]
    assert [r["loss"] for r in val[1]] == pytest.approx([r["loss"] for r in val[0]], rel=1e-5)


@pytest.mark.slow
def test_fsdp_evaluates_and_samples_without_a_validation_pass_first(data_dir, tmp_path):
    shared_file("hellaswag_val.jsonl.gz")
    args = [*train_argv(data_dir, *SMALL), "max_steps=3", "fsdp=true", "val_every=0"]
    args += ["hellaswag_every=2", "hellaswag_limit=6", "sample_every=2", "sample_count=1", "sample_tokens=4"]
    run_to_end([*args, "--out", str(tmp_path)], nproc=2)
    assert [r["n"] for r in events(tmp_path, "hellaswag")] == [6, 6, 6]  # steps 0, 2 and the final 3
    assert "Hello, I'm a language model," in (tmp_path / "samples.txt").read_text()


def _confident_wrong():
    """Rows whose target logit sits ~25 nats below the others: fp16's softmax underflows there."""
    torch.manual_seed(0)
    h = torch.randn(64, 32)
    w = torch.randn(70, 32) * 0.05
    t = torch.randperm(64)
    w[t] -= 25 * h / h.norm(dim=1, keepdim=True) ** 2  # each target's logit: about -25
    return h.requires_grad_(), w.requires_grad_(), t


def test_fp16_loss_is_finite_and_its_gradients_match_float64():
    h, w, t = _confident_wrong()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = linear_cross_entropy(h, w, t, 64, chunk=40)
    loss.backward()
    h64, w64 = (x.detach().double().requires_grad_() for x in (h, w))
    ref = F.cross_entropy(h64 @ w64[:64].t(), t)
    ref.backward()
    assert ref.item() > 17 and math.isfinite(loss.item())
    assert loss.item() == pytest.approx(ref.item(), rel=2e-3)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=0, atol=2e-3 * h64.grad.abs().max().item())
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=0, atol=2e-3 * w64.grad.abs().max().item())
    assert torch.all(w.grad[64:] == 0)


@pytest.mark.slow
def test_fp16_training_scales_its_loss_and_stays_finite(data_dir, tmp_path, monkeypatch):
    scalers = []
    init = tr.Trainer.__init__

    def spy(self, *a, **k):
        init(self, *a, **k)
        scalers.append(self.scaler)

    monkeypatch.setattr(tr.Trainer, "__init__", spy)
    # fp16 matmuls are emulated on CPUs: the smallest batch that still accumulates over micro-steps
    small = ["micro_batch_size=1", "seq_len=16", "total_batch_size=32", "max_steps=2"]
    tr.train(small_cfg("dtype=fp16", *small), data_dir, tmp_path)
    assert isinstance(scalers[0], torch.amp.GradScaler) and scalers[0].get_scale() > 1
    assert all(math.isfinite(v) for v in losses(tmp_path).values())


def test_auto_dtype_never_picks_emulated_bf16_on_a_gpu(monkeypatch):
    calls = []

    def is_bf16_supported(including_emulation=True):  # a V100: bf16 only through emulation
        calls.append(including_emulation)
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert precision.resolve_dtype("auto", torch.device("cuda")) == "fp16" and calls == [False]


def test_hellaswag_runs_in_the_autocast_dtype_it_is_given(monkeypatch):
    from gpt2repro.evals import hellaswag

    shared_file("gpt2.tiktoken")
    model = GPT(model_config("tiny", vocab_multiple=64))
    seen = []
    hidden = model.hidden

    def recording(*a, **k):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
        return hidden(*a, **k)

    monkeypatch.setattr(model, "hidden", recording)
    example = {"ctx": "A man", "endings": [" runs.", " sits.", " eats.", " sleeps."], "label": 0}
    example.update(ctx_a="A man", ctx_b="", activity_label="Walking")
    for dtype, expected in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        seen.clear()
        hellaswag.evaluate(model, [example], dtype=dtype)
        assert seen == [expected], dtype


class _MatmulShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm_.default):
            self.shapes.append(tuple(s for a in args if isinstance(a, torch.Tensor) for s in a.shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("n", [96, 300])  # one chunk, several
def test_lm_head_gemms_run_at_the_padded_width(n):
    torch.manual_seed(0)
    h = torch.randn(n, 16, requires_grad=True)
    w = torch.randn(128, 16, requires_grad=True)  # 100 real classes padded to 128
    t = torch.randint(0, 100, (n,))
    with _MatmulShapes() as rec:
        linear_cross_entropy(h, w, t, 100, chunk=128).backward()
    widths = {s for shape in rec.shapes for s in shape if s in (100, 128)}
    assert len(rec.shapes) >= 3 and widths == {128}, rec.shapes
    assert torch.all(w.grad[100:] == 0)
    ref = F.cross_entropy(h.detach() @ w.detach()[:100].t(), t)
    assert linear_cross_entropy(h.detach(), w.detach(), t, 100).item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.slow
def test_torch_floor_is_the_tested_version_and_adamw_never_imports_muon():
    pyproject = (ROOT / "pyproject.toml").read_text()
    floor = re.search(r'"torch>=([\d.]+)"', pyproject).group(1)
    assert f"torch {floor}" in (ROOT / "README.md").read_text()  # the README says what was tested
    installed = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    assert installed >= tuple(int(p) for p in floor.split(".")[:2])
    # gpt2repro.training.muon needs torch.optim._muon (torch 2.9+): only Muon runs may import it
    code = (
        "import sys, gpt2repro.training.train, gpt2repro.cli; print('gpt2repro.training.muon' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# torch.cuda.get_device_name strings as real machines report them, with their dense bf16 peaks
DEVICE_NAMES = {
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H800": 989e12,
    "NVIDIA B200": 2250e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA L40": 181e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10": 125e12,
    "NVIDIA GeForce RTX 4090": 165e12,
    "NVIDIA GeForce RTX 3090": 71e12,
    "NVIDIA RTX A6000": 155e12,
    "Tesla V100-SXM2-16GB": None,  # no native bf16
    "Tesla T4": None,
    "NVIDIA A10G": None,  # not in the table: no MFU rather than a guess
    "NVIDIA GeForce GTX 1080": None,
}


def test_gpu_peaks_match_exact_model_names_and_the_dtype():
    assert {name: mfu.gpu_peak(name, "bf16") for name in DEVICE_NAMES} == DEVICE_NAMES
    assert mfu.gpu_peak("NVIDIA A100-SXM4-80GB", "fp32") == 156e12  # TF32 tensor cores
    assert mfu.gpu_peak("Tesla V100-SXM2-16GB", "fp32") == 15.7e12  # no TF32 on Volta
    assert mfu.gpu_peak("Tesla V100-SXM2-16GB", "fp16") == 125e12


@pytest.mark.measures_peak
def test_cpu_mfu_never_exceeds_100_percent_after_a_busy_start(data_dir, tmp_path, monkeypatch, capsys):
    """A peak measured while the machine was busy (here: 1 MFLOP/s) is raised by the first faster step."""
    mfu.device_peak_flops.cache_clear()
    monkeypatch.setattr(mfu, "gemm_flops", lambda *a, **k: 1e6)
    try:
        tr.train(small_cfg("max_steps=4", "log_every=1"), data_dir, tmp_path)
    finally:
        mfu.device_peak_flops.cache_clear()
    logged = [r["mfu"] for r in events(tmp_path, "train")]
    assert len(logged) == 4 and logged[0] == 1.0 and all(0 < m <= 1.0 for m in logged)
    printed = [float(p) for p in re.findall(r"mfu ([\d.]+)%", capsys.readouterr().out)]
    assert len(printed) == 4 and max(printed) <= 100.0


@pytest.mark.measures_peak
def test_a_busy_start_is_measured_against_the_hosts_best_peak(data_dir, tmp_path, monkeypatch, capsys):
    """The host measured 1 TFLOP/s once, quiet; a run that starts busy (its GEMMs at 1 MFLOP/s) is
    measured against that, not against its own lowered measurement raised by its first step (which
    read 1.00), and says so. A faster measurement replaces the cached one."""
    cfg = small_cfg("max_steps=3", "log_every=1")
    monkeypatch.setattr(mfu, "gemm_flops", lambda *a, **k: 1e12)
    mfu.device_peak_flops.cache_clear()
    try:
        assert mfu.Peak(torch.device("cpu"), "fp32").flops == 1e12  # a quiet moment, kept
        monkeypatch.setattr(mfu, "gemm_flops", lambda *a, **k: 1e6)  # busy now
        mfu.device_peak_flops.cache_clear()
        tr.train(cfg, data_dir, tmp_path / "run")
        mfu.device_peak_flops.cache_clear()
        monkeypatch.setattr(mfu, "gemm_flops", lambda *a, **k: 2e12)  # quieter than ever
        assert mfu.Peak(torch.device("cpu"), "fp32").flops == 2e12
    finally:
        mfu.device_peak_flops.cache_clear()
    rows = events(tmp_path / "run", "train")
    flops = GPT(cfg.model).flops_per_token(cfg.seq_len) * cfg.total_batch_size  # the step's FLOPs
    assert [r["mfu"] for r in rows] == pytest.approx([flops / r["dt"] / 1e12 for r in rows], rel=1e-9)
    assert all(r["mfu_peak"] == 1e12 for r in rows) and max(r["mfu"] for r in rows) < 0.5
    out = capsys.readouterr().out
    assert "MFU against 1,000.0 GFLOP/s (fp32): this host's best GEMM, measured" in out
    assert "(0.0 GFLOP/s now)" in out


def test_peak_is_raised_only_on_a_cpu():
    peak = mfu.Peak.__new__(mfu.Peak)
    peak.flops, peak.measured = 100.0, True
    assert peak.mfu(50.0, 1.0) == 0.5 and peak.mfu(200.0, 1.0) == 1.0 and peak.flops == 200.0
    peak.flops, peak.measured = 100.0, False  # a GPU's table value is not raised: >1 would be a bug shown
    assert peak.mfu(200.0, 1.0) == 2.0


RANK_DIRS = """
import os, sys
from gpt2repro.cli import main
sys.exit(main([*sys.argv[1:], "--out", os.path.join(os.environ["RUN_ROOT"], "rank" + os.environ["RANK"])]))
"""


@pytest.mark.slow
def test_ranks_that_find_different_checkpoints_all_stop_with_one_line(data_dir, tmp_path):
    """Two 'nodes' without shared storage: rank 0's directory holds a checkpoint, rank 1's none."""
    args = [*train_argv(data_dir, *SMALL)]
    run_to_end([*args, "max_steps=2", "--out", str(tmp_path / "rank0")])
    script = tmp_path / "per_rank.py"
    script.write_text(RANK_DIRS)
    out = run_script(script, *args, "max_steps=4", launcher=EVERY_RANK_REPORTS, RUN_ROOT=str(tmp_path))
    errors = error_lines(out)
    assert out.returncode != 0 and len(errors) == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert all("ranks disagree on the checkpoint to resume from" in e for e in errors)
    assert "rank 0: step 2" in errors[0] and "rank 1: no checkpoint (fresh start)" in errors[0]
    assert not (tmp_path / "rank1" / "checkpoints").exists()  # nobody started training
    assert (
        "gpt2repro/training/train.py" not in out.stdout + out.stderr
    )  # no traceback of ours (torchrun prints its own)


def test_ddp_keeps_gradients_in_its_buckets(tmp_path):
    import torch.distributed as dist

    from gpt2repro.parallel.distributed import DistInfo, wrap_model

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = wrap_model(
            GPT(model_config("tiny")), small_cfg(), DistInfo(0, 0, 2, torch.device("cpu")), False
        )
        assert model.gradient_as_bucket_view
    finally:
        dist.destroy_process_group()


def test_tf32_is_enabled_on_cuda_for_every_command(monkeypatch, run_dir):
    from gpt2repro import cli

    before = torch.get_float32_matmul_precision()
    try:
        precision.enable_tf32(torch.device("cpu"))
        assert torch.get_float32_matmul_precision() == before
        precision.enable_tf32(torch.device("cuda"))
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
    seen = []
    monkeypatch.setattr(precision, "enable_tf32", seen.append)
    shared_file("gpt2.tiktoken")
    assert cli.main(["sample", "--checkpoint", str(run_dir), "-n", "1", "--max-new-tokens", "2"]) == 0
    assert seen == [torch.device("cpu")]


def test_kv_cache_prefill_uses_plain_causal_attention(monkeypatch):
    from gpt2repro.generation.generate import generate
    from gpt2repro.generation.sampling import GREEDY

    torch.manual_seed(0)  # the same model and prompt whatever ran before
    model = GPT(model_config("tiny", vocab_multiple=64)).eval()
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((q.size(2), k.size(2), attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    prompt = torch.randint(0, 50257, (2, 9))
    cached = generate(model, prompt, 4, sampling=GREEDY)
    prefill = [c for c in calls if c[0] == 9]
    assert prefill and all(c == (9, 9, True, True) for c in prefill)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    assert torch.equal(cached, generate(model, prompt, 4, sampling=GREEDY, use_cache=False))


@pytest.mark.slow
def test_gpu_check_runs_every_check_on_cpu(data_dir):
    shared_file("hellaswag_val.jsonl.gz")
    cmd = [
        sys.executable,
        "scripts/gpu_check.py",
        "--device",
        "cpu",
        "--size",
        "tiny",
        "--data",
        str(data_dir),
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) >= 12 and not any("| FAIL |" in r for r in rows), out.stdout
    checks = ["compile graphs", "recompiles", "fused vs unfused loss", "fp16", "resume", "hellaswag"]
    for check in [*checks, "FSDP x2", "FSDP sharded checkpoint resumed on 1 process"]:
        assert any(check in r for r in rows), check


def test_a_host_whose_peak_is_cached_measures_briefly(tmp_path, monkeypatch):
    """Every training process measures the CPU's GEMM peak; once the host's best is cached, a short
    look (which may still raise it) is enough: 12 GEMMs instead of 32 at every start."""
    monkeypatch.setenv("GPT2REPRO_CACHE", str(tmp_path))
    asked = []
    monkeypatch.setattr(mfu, "gemm_flops", lambda *a, repeats, **k: asked.append(repeats) or 1e9 * len(asked))
    mfu.device_peak_flops.cache_clear()
    try:
        first = mfu.Peak(torch.device("cpu"), "fp32").flops
        mfu.device_peak_flops.cache_clear()
        second = mfu.Peak(torch.device("cpu"), "fp32").flops
    finally:
        mfu.device_peak_flops.cache_clear()
    assert asked == [7, 2] and (first, second) == (1e9, 2e9)  # the brief look raised the best
