"""The CPU channel reduction is compiled once per ISA (at::vec baseline and AVX2+FMA:
csrc/cpu/channel_cpu_kernels.h) and picks one at run time from ATen's CPU capability
(csrc/cpu/channel.cpp). The normal test run exercises the build this machine selects; this test
runs the baseline and AVX2 builds too (ATEN_CPU_CAPABILITY=default / avx2 in a fresh process) and
holds each to the float64 twin, in both layouts, on the short-`inner` path, with vector tails
and several chunks, and every term combination.
"""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    sys.path[:0] = [{root!r}, {tests!r}]
    from oba_ext.ops import channel_first_order_reduce, channel_score_reduce
    from oba_ext.reference import channel as ref
    from tolerances import UNIT_ROUNDOFF, assert_close_rel
    print(torch.backends.cpu.get_cpu_capability())
    g = torch.Generator().manual_seed(0)
    for shape, dim, cl in (((3, 37, 5, 7), 1, False), ((3, 37, 5, 7), 1, True), ((50, 129), -1, False),
                           ((40, 37, 8, 8), 1, False), ((400, 37, 2, 3), 1, False), ((700, 129), -1, False),
                           ((9, 5, 1, 33), 1, False)):
        a, b, c, d = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4))
        if cl:
            a, b, c, d = (t.contiguous(memory_format=torch.channels_last) for t in (a, b, c, d))
        for bb, cc in ((b, c), (None, c), (b, None), (None, None)):
            got, want = channel_score_reduce(a, bb, cc, d, dim), ref.channel_score_reduce(a, bb, cc, d, dim)
            assert_close_rel(got[0], want[0], f"{{shape}} second")
            assert_close_rel(got[1], want[1], f"{{shape}} first")
        assert_close_rel(channel_first_order_reduce(a, d, dim),
                         ref.channel_first_order_reduce(a, d, dim), f"{{shape}} first-order")
        f32 = [t.float() for t in (a, b, c, d)]
        got = channel_score_reduce(*f32, dim)[0]
        assert_close_rel(got, ref.channel_score_reduce(*(t.double() for t in f32), dim)[0],
                         f"{{shape}} float32 inputs", rtol=2 * UNIT_ROUNDOFF[torch.float32])  # float64 sum rounded once
    print("ok")
""")


@pytest.mark.parametrize("capability", ["default", "avx2", None], ids=["baseline_isa", "avx2", "selected_isa"])
def test_each_cpu_build_matches_the_twin(kernels, capability):
    kernels("cpu")
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"))],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.split()
    assert lines[-1] == "ok", out.stdout
    if capability == "avx2" and lines[0] == "DEFAULT":
        pytest.skip("this CPU has no AVX2 (ATen runs at DEFAULT): the baseline case covers it")
    if capability is not None:
        assert lines[0] == capability.upper(), out.stdout
