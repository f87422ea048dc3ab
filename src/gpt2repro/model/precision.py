"""Precision in one place: the dtype names users write, what `auto` means on a device, and the
autocast context for forward passes.

Two different things are called a dtype, and the CLI names them apart: the *autocast* dtype
(training and evaluation: weights stay fp32, matmuls run in bf16/fp16) and the *weight* dtype
(sampling: the weights themselves are cast, which is what makes decoding cheaper)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (oneDNN's check: AVX-512 or AMX on x86).
    Without it, PyTorch falls back to a reference kernel hundreds of times slower than fp32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_dtype(name: str, device: torch.device) -> str:
    """`auto` is bf16 on CUDA GPUs that have it (fp16 on older ones), bf16 on CPUs with native bf16
    matmuls, and fp32 elsewhere."""
    if name != "auto":
        torch_dtype(name)
        return name
    if device.type == "cuda":  # not counting emulation: V100/T4 "support" bf16 at a fraction of fp16's speed
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


def enable_tf32(device: torch.device) -> None:
    """fp32 matmuls on TF32 tensor cores (CUDA; Ampere and newer): training, evaluation, sampling
    and benchmarks all run with it, as the original run did. No effect on CPU."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")


def tf32_enabled(device: torch.device) -> bool:
    return device.type == "cuda" and torch.get_float32_matmul_precision() != "highest"


def slow_dtype_warning(name: str, device: torch.device) -> str | None:
    """A warning when `name` will be emulated slowly on `device`, else None."""
    native = {"bf16": cpu_has_fast_bf16, "fp16": lambda: bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())}
    if device.type == "cpu" and name in native and not native[name]():
        return f"{name} on this CPU has no native matmul support and runs far slower than fp32 (auto picks fp32 here)"
    return None


def autocast(device: torch.device, name: str) -> AbstractContextManager:
    """Mixed precision for a forward pass: nothing for fp32, torch.autocast otherwise."""
    if name == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch_dtype(name))
