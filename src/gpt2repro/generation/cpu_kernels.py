"""One-row products for decoding on a CPU: batch-1 decoding reads every weight once per token, so a
step's speed is how fast its ~50 matmuls stream the weights (benchmarks/RESULTS.md, issue #42).

- `cpu_kernels.cpp`, where the CPU has AVX-512 (`available()`; built on first use into torch's
  extension cache, ~15 s once per machine, by torch.utils.cpp_extension and ninja): int8 weights
  through VNNI (the activations rounded to int8 per block of 32, as llama.cpp's q8_0 rounds them:
  `round_activations`), bf16 through AVX-512 BF16's pair products, fp32 through four accumulators.
  Called from compiled steps through the dispatcher in C++ (no Python per call).
- Elsewhere (AVX2-only CPUs, fp16, float64, or GPT2REPRO_CPU_KERNELS=loop): one compiled loop
  (`_rows_times`, inductor's C++), each weight converted to fp32 in registers, fp32 activations.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from .sampling import GenerateError

BLOCK = 32  # the int8 kernel rounds activations per this many values (q8_0's block)
NEEDS = {  # each C++ kernel's CPU flags (as /proc/cpuinfo names them)
    "int8": {"avx512f", "avx512bw", "avx512_vnni"},
    "bf16": {"avx512f", "avx512bw", "avx512_bf16"},
    "fp32": {"avx512f"},
}
_FOUND: list[frozenset[str]] = []  # which kernels this process runs: found once (`available`)


def _cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if os.environ.get("GPT2REPRO_CPU_KERNELS") == "loop" or not cpuinfo.exists():
        return set()
    return set(cpuinfo.read_text().split())


def _shape(x: torch.Tensor, w: torch.Tensor, *rest) -> torch.Tensor:  # for torch.compile's tracing
    return x.new_empty(x.size(0), w.size(0), dtype=torch.float32)


def _build() -> None:
    import ninja
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # (a venv's python run without activating the venv)
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    source = str(Path(__file__).with_name("cpu_kernels.cpp"))
    try:
        flags = dict(extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])
        cpp_extension.load("gpt2repro_cpu_kernels", [source], is_python_module=False, **flags)
    except (RuntimeError, OSError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GenerateError(f"decoding could not build its CPU kernels ({first})") from e
    for name in NEEDS:
        torch.library.register_fake(f"gpt2repro::{name}_linear", _shape)


def available() -> frozenset[str]:
    """The C++ kernels this CPU runs ("int8", "bf16", "fp32"), built on first use; inside a compiled
    step, those found before it was traced (`prepare` finds them)."""
    if torch.compiler.is_compiling():
        return _FOUND[0] if _FOUND else frozenset()
    if not _FOUND:
        flags = _cpu_flags()
        found = frozenset(name for name, needs in NEEDS.items() if needs <= flags)
        if found:
            _build()
        _FOUND.append(found)
    return _FOUND[0]


def prepare(weight: torch.Tensor) -> torch.Tensor:
    """A weight as the one-row kernels read it (contiguous), after finding those kernels."""
    available()
    return weight.contiguous()


def round_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 kernel's rounding of fp32 activations, in Python: (values -127..127 as fp32, each
    value's block step) per block of BLOCK along the last dimension; x ~ values * steps."""
    pad = -x.size(-1) % BLOCK
    blocks = F.pad(x.float(), (0, pad)).unflatten(-1, (-1, BLOCK))
    top = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(top > 0, 127 / top, torch.zeros_like(top))
    values, steps = torch.round(blocks * inv), (top / 127).expand_as(blocks)
    return values.flatten(-2)[..., : x.size(-1)], steps.flatten(-2)[..., : x.size(-1)]


@torch.compile(dynamic=True)
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
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GenerateError(f"{what} needs torch.compile's C++ compiler ({first})") from e


def loop_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, w, bias) for one row through this CPU's kernel for w's dtype (bf16, fp32), else the
    loop; summed in fp32 (float64 for float64): a compiled step's matmuls on a CPU (inductor's own
    matmul for one row runs on one core: 2x slower). More rows through F.linear: the kernels read
    each weight again for every row."""
    if x.numel() != x.size(-1):
        return F.linear(x, w, bias)
    name = {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(w.dtype)
    if name in available() and x.dtype == w.dtype:
        op = torch.ops.gpt2repro.bf16_linear if name == "bf16" else torch.ops.gpt2repro.fp32_linear
        y = op(x.reshape(1, -1).contiguous(), w).to(x.dtype)
    else:
        y = loop(x, w, f"decoding {w.dtype} weights by the loop").to(x.dtype)
    y = y if bias is None else y + bias
    return y.view(*x.shape[:-1], w.size(0))
