"""Where int8 decodes through the VNNI kernel (generation/cpu_kernels.py): the CPU's flags decide, the
switch back to inductor's loop works, and a kernel that cannot be built is one line. (The kernel's
arithmetic: tests/test_int8.py.)"""

from __future__ import annotations

import os
import time

import pytest
import torch

from gpt2repro.generation import cpu_kernels, int8
from gpt2repro.generation.sampling import GenerateError


def test_the_cpus_flags_decide_and_the_loop_can_be_asked_for(monkeypatch, tmp_path):
    flags = tmp_path / "cpuinfo"
    flags.write_text("flags\t: fpu avx2 avx512f avx512bw\n")
    monkeypatch.setattr(cpu_kernels, "CPUINFO", flags)
    assert not cpu_kernels.NEEDS <= cpu_kernels._cpu_flags()  # AVX-512 without VNNI
    flags.write_text("flags\t: fpu avx2 avx512f avx512bw avx512_vnni\n")
    assert cpu_kernels.NEEDS <= cpu_kernels._cpu_flags()
    monkeypatch.setenv("GPT2REPRO_CPU_KERNELS", "loop")
    assert cpu_kernels._cpu_flags() == set()
    monkeypatch.setattr(cpu_kernels, "_FOUND", [])
    assert cpu_kernels.vnni() is False
    w, x = int8.quantize_rows(torch.randn(8, 40)), torch.randn(1, 40)
    exact = x.double() @ int8.dequantize(*w).double().T  # the loop: fp32 activations, not rounded
    torch.testing.assert_close(int8.int8_linear(x, w, None).double(), exact, rtol=0, atol=1e-5)


def test_a_kernel_that_cannot_be_built_is_one_line(monkeypatch):
    from torch.utils import cpp_extension

    def no_ninja(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions\n(more)")

    monkeypatch.setattr(cpu_kernels, "_FOUND", [])
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: set(cpu_kernels.NEEDS))
    monkeypatch.setattr(cpp_extension, "load", no_ninja)
    with pytest.raises(GenerateError, match=r"^decoding could not build its CPU kernels \(Ninja is required"):
        int8.int8_linear(torch.randn(1, 64), int8.quantize_rows(torch.randn(4, 64)), None)


def test_a_build_lock_left_by_a_killed_build_is_removed(monkeypatch, tmp_path):
    """torch's build lock waits forever for a lock whose builder was killed: one older than
    STALE_LOCK_S is removed first; a fresh one (a build running now) is left to wait on."""
    from torch.utils import cpp_extension

    lock = tmp_path / "gpt2repro_cpu_kernels" / "lock"
    lock.parent.mkdir()
    seen = []
    monkeypatch.setattr(cpp_extension, "get_default_build_root", lambda: str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: seen.append(lock.exists()))
    monkeypatch.setattr(torch.library, "register_fake", lambda *a, **k: None)  # (nothing was loaded)
    lock.touch()
    cpu_kernels._build()
    old = time.time() - cpu_kernels.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    cpu_kernels._build()
    assert seen == [True, False]
