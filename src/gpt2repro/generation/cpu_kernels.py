"""The matmuls of decoding steps on a CPU, one row (or a few) at a time: batch-1 decoding reads every
weight once per token, so a step's speed is how fast its ~50 matmuls stream the weights
(benchmarks/RESULTS.md, issue #42).

- int8 weights, where the CPU has AVX-512 VNNI (`vnni()`): `cpu_kernels.cpp`, built on first use
  into torch's extension cache (~15 s once per machine, by torch.utils.cpp_extension and ninja). As
  llama.cpp's q8_0 does, it rounds each row of activations to int8 per block of 32
  (`round_activations`) and sums the products in int32; called from compiled steps through the
  dispatcher in C++ (no Python per call).
- Everything else (int8 without VNNI, or with GPT2REPRO_CPU_KERNELS=loop set before the first int8
  step; bf16, fp16, fp32 in compiled steps): one compiled loop (`_rows_times`, inductor's C++), each
  weight converted to fp32 in registers, fp32 activations. Hand-written AVX-512 bf16 (vdpbf16ps) and
  fp32 kernels were measured no faster than this loop inside a compiled step on the AMD host, so
  there are none.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .sampling import GenerateError

BLOCK = 32  # the int8 kernel rounds activations per this many values (q8_0's block)
NEEDS = {"avx512f", "avx512bw", "avx512_vnni"}  # the int8 kernel's CPU flags (as /proc/cpuinfo names them)
CPUINFO = Path("/proc/cpuinfo")  # (Linux; elsewhere the loop)
STALE_LOCK_S = 600  # a build takes ~15 s: a lock this old was left by a killed process
# graphs of one compiled function (a decoding step per kind of model and batch, the loop per weight
# shape): past torch's default of 8, calls would silently run uncompiled (several models in a process)
RECOMPILE_LIMIT = 64
_FOUND: list[bool] = []  # whether this process runs the int8 kernel: found once (`vnni`)


def first_line(e: BaseException) -> str:
    """An exception's first line (its type where it says nothing), for a one-line error."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _cpu_flags() -> set[str]:
    if os.environ.get("GPT2REPRO_CPU_KERNELS") == "loop" or not CPUINFO.exists():
        return set()
    return set(CPUINFO.read_text().split())


def _shape(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.size(0), q.size(0))  # for torch.compile's tracing


def _build() -> None:
    from torch.utils import cpp_extension

    name, source = "gpt2repro_cpu_kernels", str(Path(__file__).with_name("cpu_kernels.cpp"))
    lock = Path(cpp_extension.get_default_build_root()) / name / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:  # a build killed midway
        lock.unlink(missing_ok=True)
    try:
        import ninja

        if shutil.which("ninja") is None:  # (a venv's python run without activating the venv)
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        flags = dict(extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])
        cpp_extension.load(name, [source], is_python_module=False, **flags)
    except (RuntimeError, OSError, ImportError) as e:
        raise GenerateError(f"decoding could not build its CPU kernels ({first_line(e)[:200]})") from e
    torch.library.register_fake("gpt2repro::int8_linear", _shape)


def vnni() -> bool:
    """Whether int8 decodes through the VNNI kernel here (built on first use); inside a compiled
    step, as found before it was traced (`int8.prepare_rows` finds it)."""
    if torch.compiler.is_compiling():
        return bool(_FOUND and _FOUND[0])
    if not _FOUND:
        found = NEEDS <= _cpu_flags()
        if found:
            _build()
        _FOUND.append(found)
    return _FOUND[0]


def round_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 kernel's rounding of fp32 activations, in Python: (values -127..127 as fp32, each
    value's block step) per block of BLOCK along the last dimension; x ~ values * steps. A block
    that is not finite has NaN steps; one too small for 127 / its top to be finite, zero values."""
    pad = -x.size(-1) % BLOCK
    blocks = F.pad(x.float(), (0, pad)).unflatten(-1, (-1, BLOCK))
    top = blocks.abs().amax(-1, keepdim=True)
    inv = 127 / top
    usable = torch.isfinite(top) & (top > 0) & torch.isfinite(inv)
    values = torch.where(usable, torch.round(blocks * torch.where(usable, inv, 0)).clamp(-127, 127), 0)
    steps = torch.where(torch.isfinite(top), top / 127, torch.nan).expand_as(blocks)
    return values.flatten(-2)[..., : x.size(-1)], steps.flatten(-2)[..., : x.size(-1)]


def rounding_linear_inputs(model: torch.nn.Module, start: int = 0) -> torch.nn.Module:
    """The model with each Linear's input (batch, positions, features), at positions from `start` on,
    rounded as the int8 kernel rounds a decoding step's (`round_activations`): a forward then
    computes the decoding steps' arithmetic (scripts/int8_quality.py, tests/test_int8.py)."""

    def hook(module: torch.nn.Module, args: tuple) -> tuple:
        x = args[0].clone()
        values, steps = round_activations(x[:, start:])
        x[:, start:] = values.to(x.dtype) * steps.to(x.dtype)
        return (x,)

    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(hook)
    return model


@torch.compile(dynamic=True, recompile_limit=RECOMPILE_LIMIT)
def _rows_times(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (rows, in) @ w^T in fp32 (float64 for float64 x), reading w (out, in) in its own dtype (int8,
    bf16, fp16): one fused loop, each weight converted in registers (no fp32 copy of w)."""
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.to(wide)[:, None, :] * w.to(wide)).sum(-1)


def loop(x: torch.Tensor, w: torch.Tensor, what: str) -> torch.Tensor:
    """`_rows_times` over x's rows (x (..., in)): (rows, out)."""
    rows = x.numel() // x.size(-1)
    try:
        return _rows_times(x.reshape(rows, x.size(-1)), w)
    except torch._dynamo.exc.BackendCompilerFailed as e:
        raise GenerateError(f"{what} needs torch.compile's C++ compiler ({first_line(e)})") from e


def loop_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, w, bias) for one row through the same loop, summed in fp32 (float64 for float64):
    a compiled step's matmuls on a CPU (inductor's own matmul for one row runs on one core: 2x
    slower). More rows through F.linear: the loop converts each weight again for every row."""
    if x.numel() != x.size(-1):
        return F.linear(x, w, bias)
    y = loop(x, w, f"decoding {w.dtype} weights by the loop").to(x.dtype)
    y = y if bias is None else y + bias
    return y.view(*x.shape[:-1], w.size(0))
