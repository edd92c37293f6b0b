"""The CUDA channel kernels' device code, executed on the CPU (issue 11, ask 1).

``torch.ops.oba_ext._emulate_channel_score_reduce_cuda`` / ``_emulate_channel_first_order_reduce_cuda``
run the OBA_HD functions of csrc/common/channel_kernel.h — the per-element terms and dtype
conversions, the launch plan, each thread's index loop, the partial layout, the combine order and
stage 2 — in the CUDA kernels' own block/thread decomposition (csrc/cpu/channel_emulate.cpp),
with the device accumulation type (float32 for 16/32-bit inputs). These tests compare them with
the float64 twin on awkward sizes (channels not a multiple of 32, inner sizes crossing the
256-thread stride, row splits that do not divide the rows, empty splits), so an index or
reduction-order bug in the device code fails on a machine without a GPU.

The weight kernels have no custom device code to emulate: csrc/cuda/weight.cu registers the host
code of csrc/common/weight.h, which the CPU tests already run (tests/test_weight_ops.py,
tests/test_half_precision.py).
"""
import pytest
import torch

from oba_ext.reference import channel as ref
from tolerances import assert_close_rel, assert_matches

SMS = 132  # H100/H200 SXM multiprocessor count (the emulated device)

# (id, shape, channel_dim, memory layout) -> which stage-1 kernel runs:
#   rows: (outer, C, inner) with inner > 1;  cols: channel innermost (inner == 1 or channels-last)
CASES = [
    ("rows_inner77", (3, 5, 7, 11), 1, "contiguous"),        # rows; 77-element rows
    ("rows_inner257", (5, 2, 257), 1, "contiguous"),         # rows; a row crosses the 256-thread stride
    ("rows_inner600", (2, 3, 600), 1, "contiguous"),         # rows; > 2 passes of 256 threads per row
    ("rows_outer1", (3, 4, 5), 0, "contiguous"),             # rows; channel dim 0 (outer = 1)
    ("rows_3d_conv", (2, 3, 2, 3, 4), 1, "contiguous"),
    ("cols_c33", (37, 33), -1, "contiguous"),                # cols; 2 x-blocks, 31 idle columns
    ("cols_c1", (45, 1), 1, "contiguous"),
    ("cols_nhwc_c70", (3, 70, 5, 2), 1, "channels_last"),    # cols via channels-last memory
    ("cols_ntc", (3, 13, 65), 2, "contiguous"),
    ("cols_1d", (129,), 0, "contiguous"),                    # M = 1
]
# (b present, c present)
TERMS = [(True, True), (False, True), (True, False), (False, False)]


def make(shape, layout, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def args_for(shape, layout, dtype, with_b=True, with_c=True):
    a, b, c, d = (make(shape, layout, dtype, s) for s in (11, 12, 13, 14))
    return a, (b if with_b else None), (c if with_c else None), d


def up(t):
    return None if t is None else t.to(torch.float64)


def emulate(a, b, c, d, dim, sms=SMS, splits=0):
    return torch.ops.oba_ext._emulate_channel_score_reduce_cuda.default(a, b, c, d, dim, sms, splits)


def emulate_first(a, d, dim, sms=SMS, splits=0):
    return torch.ops.oba_ext._emulate_channel_first_order_reduce_cuda.default(a, d, dim, sms, splits)


def check_against_twin(args, dim, dtype, what, **kw):
    second, first = emulate(*args, dim, **kw)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert second.dtype == want and first.dtype == want, (second.dtype, first.dtype)
    ref2, ref1 = ref.channel_score_reduce(*(up(t) for t in args), dim)
    if dtype == torch.float64:
        assert_close_rel(second, ref2, f"{what} second")
        assert_close_rel(first, ref1, f"{what} first")
    else:
        twin2, twin1 = ref.channel_score_reduce(*args, dim)
        assert_matches(second, ref2, twin2, dtype, what=f"{what} second")
        assert_matches(first, ref1, twin1, dtype, what=f"{what} first")
    a, _, _, d = args
    only = emulate_first(a, d, dim, **kw)
    assert only.dtype == want
    if dtype == torch.float64:
        assert_close_rel(only, ref1, f"{what} first-order op")
    else:
        assert_matches(only, ref1, ref.channel_first_order_reduce(a, d, dim), dtype,
                       what=f"{what} first-order op")


@pytest.mark.parametrize("with_b,with_c", TERMS, ids=["b_c", "c", "b", "none"])
@pytest.mark.parametrize("name,shape,dim,layout", CASES, ids=[c[0] for c in CASES])
def test_emulated_cuda_kernels_float64(kernels, name, shape, dim, layout, with_b, with_c):
    """float64: the device decomposition matches the float64 twin to 1e-10 (SPEC §7)."""
    kernels("cpu")
    check_against_twin(args_for(shape, layout, torch.float64, with_b, with_c), dim, torch.float64,
                       name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("name,shape,dim,layout", CASES, ids=[c[0] for c in CASES])
def test_emulated_cuda_kernels_low_precision(kernels, name, shape, dim, layout, dtype):
    """float32 accumulation on the device: the kernel rule of tests/tolerances.py."""
    kernels("cpu")
    check_against_twin(args_for(shape, layout, dtype), dim, dtype, name)


# forced row-split counts: uneven last split, more splits than rows (empty splits), one per row
@pytest.mark.parametrize("splits", [1, 4, 7, 30, 37, 64])
@pytest.mark.parametrize("shape,dim,layout", [((37, 3, 5), 1, "contiguous"),
                                              ((37, 33), 1, "contiguous"),
                                              ((37, 40, 1, 1), 1, "channels_last")],
                         ids=["rows", "cols", "cols_nhwc"])
def test_emulated_row_splits(kernels, shape, dim, layout, splits):
    kernels("cpu")
    check_against_twin(args_for(shape, layout, torch.float64), dim, torch.float64,
                       f"{shape} splits={splits}", splits=splits)


@pytest.mark.parametrize("sms", [1, 108, 132])
def test_emulated_launch_plans(kernels, sms):
    """The split count the launch plan picks for A100 (108 SMs), H100/H200 (132) and 1 SM, on
    sizes where it splits the rows (stage 2 then adds several partials per channel)."""
    kernels("cpu")
    for shape, dim in (((300, 3, 20), 1), ((2000, 7), 1)):
        check_against_twin(args_for(shape, "contiguous", torch.float64), dim, torch.float64,
                           f"{shape} sms={sms}", sms=sms)


def test_emulation_is_bitwise_reproducible_and_order_sensitive(kernels):
    """Same plan, same bits; a different split count adds in another order (float32 results
    differ in the last bits), which is what makes the emulated order a real check."""
    kernels("cpu")
    args = args_for((64, 3, 50), "contiguous", torch.float32)
    x = emulate(*args, 1, splits=8)
    y = emulate(*args, 1, splits=8)
    assert all(torch.equal(p, q) for p, q in zip(x, y))
    z = emulate(*args, 1, splits=5)
    assert any(not torch.equal(p, q) for p, q in zip(x, z))


def test_emulation_refuses_bad_arguments(kernels):
    kernels("cpu")
    a = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="num_sms"):
        emulate(a, None, None, a, 1, sms=0)
    with pytest.raises(RuntimeError, match="splits"):
        emulate(a, None, None, a, 1, splits=-1)
    with pytest.raises(RuntimeError, match=r"argument 'd' must have the shape of 'a'"):
        emulate(a, None, None, torch.randn(2, 3, 5), 1)
