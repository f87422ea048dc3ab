"""Large CPU allocations reuse freed memory after `reuse_freed_memory` (training/heap.py): the second
of two same-sized allocations faults in (almost) no pages. Each case runs in a fresh process: the
setting holds for a process's life, and pytest's workers train with it on."""

import json
import os
import platform
import subprocess
import sys
from unittest import mock

import pytest
import torch

PROBE = """
import ctypes, json, resource, sys
import torch
from gpt2repro.training.heap import reuse_freed_memory
took = reuse_freed_memory(torch.device("cpu")) if sys.argv[1] == "heap" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = 64 << 20  # above glibc's largest mmap threshold (32 MB)
def touch():
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    return p
libc.free(touch())
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = touch()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
libc.free(p)
print(json.dumps({"took": took, "faults": faults, "pages": size // resource.getpagesize()}))
"""

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's settings: glibc only")


def _probe(mode: str, **env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
        env={**os.environ, **env},
    )  # fmt: skip
    return json.loads(out.stdout)


def test_freed_memory_is_reused_without_faulting_pages_in_again():
    default, heap = _probe("default"), _probe("heap", GPT2REPRO_CPU_HEAP="1")
    assert heap["took"] is True
    assert default["faults"] >= default["pages"] // 2  # glibc's default: a fresh mapping each time
    assert heap["faults"] < default["pages"] // 100  # the freed block again, its pages still mapped


def test_the_environment_variable_leaves_glibcs_default():
    off = _probe("heap", GPT2REPRO_CPU_HEAP="0")
    assert off["took"] is False
    assert off["faults"] >= off["pages"] // 2


def test_a_setting_other_than_0_or_1_is_one_line(monkeypatch):
    from gpt2repro.errors import UserError
    from gpt2repro.training import heap

    monkeypatch.setenv(heap.ENV, "off")
    with pytest.raises(UserError, match="GPT2REPRO_CPU_HEAP='off': expected 1"):
        heap.reuse_freed_memory(torch.device("cpu"))


def test_a_process_computing_elsewhere_keeps_glibcs_default(monkeypatch):
    """Only a CPU process: a GPU run's host memory is left as glibc manages it."""
    from gpt2repro.training import heap

    monkeypatch.setenv(heap.ENV, "1")
    with mock.patch("ctypes.CDLL") as libc:
        assert heap.reuse_freed_memory(torch.device("meta")) is False
    libc.assert_not_called()
