"""Large CPU tensors from the heap, so that memory freed by one step is reused by the next.

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh mapping and
unmaps it when freed, so the next step touches new pages and the kernel faults every one of them in
again. A CPU training step allocates several such tensors each step (the tied embedding's gradient,
the lm_head's gradient, AdamW's and autocast's temporaries), an evaluation each batch's logits; the
faults are a large part of such a step (benchmarks/RESULTS.md, "Training MFU"). With mmap off and
the heap not trimmed below 2 GB free, a freed block stays mapped and is handed out again. Allocation
only: the arithmetic, and so every loss and score, is unchanged. `train` and `eval` set it on a CPU.

Only glibc (Linux) has these settings; elsewhere nothing changes. The process keeps its peak
memory until it ends, which suits a training or evaluation run; `GPT2REPRO_CPU_HEAP=0` leaves
glibc's default."""

from __future__ import annotations

import ctypes
import os
import platform
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    import torch

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's malloc.h
_TRIM_ABOVE = 2**31 - 1  # bytes free at the heap's top before glibc returns them (its largest int)
ENV = "GPT2REPRO_CPU_HEAP"


def reuse_freed_memory(device: torch.device) -> bool:
    """For a process computing on `device`: serve large allocations from the heap from now on if it
    is the CPU (see above); whether that took effect."""
    setting = os.environ.get(ENV, "1")
    if setting not in ("0", "1"):
        raise UserError(f"{ENV}={setting!r}: expected 1 (large tensors from the heap, the default) or 0")
    if setting == "0" or device.type != "cpu" or platform.libc_ver()[0] != "glibc":  # else no such settings
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_ABOVE))
