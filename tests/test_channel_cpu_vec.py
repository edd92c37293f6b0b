"""The vectorised CPU channel reduction (csrc/cpu/channel.cpp + channel_cpu_kernels.h): bitwise
determinism across thread counts on every path (rows kernel, short-`inner` path, cols kernel) with
several chunks, and the isolation of its per-ISA builds (no function compiled for AVX2 can be
picked by the linker for baseline code). Numbers vs the twin: tests/test_channel_cpu_isa.py and
tests/test_channel_ops.py.
"""
import glob
import os
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (shape, channel_dim, channels_last): each spans several chunks of the CPU kernel (~2^15
# elements per task) and has vector tails.
PATHS = {
    "rows": ((40, 37, 8, 8), 1, False),
    "short_inner": ((400, 37, 2, 3), 1, False),
    "cols_channels_last": ((40, 37, 5, 7), 1, True),
    "cols_tokens": ((7, 100, 129), -1, False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_bitwise_same_for_1_to_4_threads(kernels, path, dtype):
    kernels("cpu")
    from oba_ext.ops import channel_first_order_reduce, channel_score_reduce
    shape, dim, cl = PATHS[path]
    g = torch.Generator().manual_seed(1)
    a, b, c, d = (torch.randn(shape, generator=g, dtype=dtype) for _ in range(4))
    if cl:
        a, b, c, d = (t.contiguous(memory_format=torch.channels_last) for t in (a, b, c, d))
    old = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 4):
            torch.set_num_threads(n)
            results.append((*channel_score_reduce(a, b, c, d, dim), channel_first_order_reduce(a, d, dim)))
    finally:
        torch.set_num_threads(old)
    for n, r in zip((2, 3, 4), results[1:]):
        assert all(torch.equal(x, y) for x, y in zip(results[0], r)), f"{path}: {n} threads differ from 1"


def _isa_objects():
    return sorted(glob.glob(os.path.join(ROOT, "build", "temp.*", "csrc", "cpu", "channel_isa_avx2.o")))


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_isa_builds_define_only_their_own_symbols():
    """Every function the AVX2 object defines with linkage (so that the linker could merge it
    with a same-named one from baseline code) lives in that build's own namespaces
    (oba_ext::cpu_avx2, at::vec::AVX2): an inline function or template instance shared with
    other files would be AVX2 code that a CPU without AVX2 could end up running."""
    objs = _isa_objects()
    if not objs:
        pytest.skip("no in-place build objects (build/temp.*/csrc/cpu/channel_isa_avx2.o)")
    for obj in objs:
        own = ("oba_ext::cpu_avx2::", "at::vec::AVX2::")
        out = subprocess.run(["nm", "-C", "--defined-only", obj], capture_output=True, text=True, check=True)
        shared = []
        for line in out.stdout.splitlines():
            parts = line.split(maxsplit=2)
            if len(parts) == 3 and parts[1] in "TWVu" and not any(ns in parts[2] for ns in own):
                shared.append(parts[2])
        assert not shared, f"{os.path.basename(obj)} defines symbols outside its ISA namespaces: {shared[:5]}"
