"""channel_score_reduce(_add_) kernels vs their pure-PyTorch twins (oba_ext/reference/channel.py).

second[k] = Σ a⊙(b − d) + c⊙d, first[k] = Σ a⊙d over every dim but channel_dim (SPEC §5).
"""
import pytest
import torch

from oba_ext.reference import channel as ref
from tolerances import F32_ACCUMULATE, F64_SAME_FORMULA, assert_close_rel, assert_matches

# (name, shape, channel_dim, memory layout of the inputs)
CASES = [
    ("nchw", (2, 3, 5, 4), 1, "contiguous"),
    ("nchw_c129", (2, 129, 3, 3), 1, "contiguous"),
    ("nchw_c1", (3, 1, 4, 5), 1, "contiguous"),
    ("channels_last", (2, 3, 5, 4), 1, "channels_last"),
    ("channels_last_c129", (3, 129, 2, 3), 1, "channels_last"),
    ("ntc_last", (2, 3, 129), -1, "contiguous"),
    ("ntc_dim2", (3, 5, 3), 2, "contiguous"),
    ("nc", (129, 3), 1, "contiguous"),
    ("nc_n1", (1, 129), 1, "contiguous"),
    ("conv1d", (2, 3, 7), 1, "contiguous"),
    ("conv3d_act", (2, 3, 2, 3, 4), 1, "contiguous"),
    ("one_d", (129,), 0, "contiguous"),
    ("channel_dim0", (3, 4, 5), 0, "contiguous"),
    ("transposed", (4, 3, 5), 1, "transposed"),
    ("sliced", (2, 3, 5, 4), 1, "sliced"),
    ("expanded", (4, 3, 5), 1, "expanded"),
    ("mixed", (2, 3, 5, 4), 1, "mixed"),          # a contiguous, b/d channels-last
    ("mixed_rev", (2, 3, 5, 4), 1, "mixed_rev"),  # a channels-last, b/d contiguous
]


def make(shape, layout, dtype, device, seed):
    """A tensor of `shape` laid out as `layout` (values fixed by `seed`)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed":  # same logical shape, the last two dims swapped in memory
        t = torch.randn(shape[0], shape[2], shape[1], generator=g, dtype=torch.float64).transpose(1, 2)
    elif layout == "sliced":
        big = torch.randn(shape[0], shape[1] * 2, shape[2] + 1, shape[3], generator=g, dtype=torch.float64)
        t = big[:, ::2, 1:, :]
    elif layout == "expanded":  # stride 0 along dim 0
        t = torch.randn(1, *shape[1:], generator=g, dtype=torch.float64).expand(shape)
    else:
        t = torch.randn(shape, generator=g, dtype=torch.float64)
    t = t.to(dtype=dtype, device=device)
    if (layout == "channels_last" or (layout == "mixed" and seed % 2 == 0)
            or (layout == "mixed_rev" and seed % 2 == 1)):
        t = t.contiguous(memory_format=torch.channels_last)
    assert t.shape == torch.Size(shape)
    return t


def inputs(shape, layout, dtype, device, with_b=True):
    a, b, c, d = (make(shape, layout, dtype, device, seed) for seed in (1, 2, 3, 4))
    return a, (b if with_b else None), c, d


def up(t):
    return None if t is None else t.to(torch.float64)


def check(args, channel_dim, dtype, what):
    from oba_ext.ops import channel_score_reduce
    out2, out1 = channel_score_reduce(*args, channel_dim)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert out2.dtype == want and out1.dtype == want, (out2.dtype, out1.dtype)
    ref2, ref1 = ref.channel_score_reduce(*(up(t) for t in args), channel_dim)
    twin2, twin1 = ref.channel_score_reduce(*args, channel_dim)
    assert_matches(out2, ref2, twin2, dtype, what=f"{what} second")
    assert_matches(out1, ref1, twin1, dtype, what=f"{what} first")


@pytest.mark.parametrize("with_b", [True, False], ids=["b", "b_none"])
@pytest.mark.parametrize("name,shape,channel_dim,layout", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_matches_reference_cpu(kernels, name, shape, channel_dim, layout, dtype, with_b):
    kernels("cpu")
    check(inputs(shape, layout, dtype, "cpu", with_b), channel_dim, dtype, name)


@pytest.mark.parametrize("shape,channel_dim,layout", [
    ((64, 8, 20, 20), 1, "contiguous"),      # several row chunks
    ((16, 7, 30, 30), 1, "channels_last"),   # several (M, C) chunks
    ((3000, 33), -1, "contiguous"),
])
def test_large_chunked_cpu(kernels, shape, channel_dim, layout):
    kernels("cpu")
    check(inputs(shape, layout, torch.float32, "cpu"), channel_dim, torch.float32, str(shape))


@pytest.mark.cuda
@pytest.mark.parametrize("with_b", [True, False], ids=["b", "b_none"])
@pytest.mark.parametrize("name,shape,channel_dim,layout",
                         CASES + [("big_rows", (64, 33, 17, 17), 1, "contiguous"),
                                  ("big_cols", (64, 129, 8, 8), 1, "channels_last"),
                                  ("big_nc", (5000, 65), 1, "contiguous")],
                         ids=[c[0] for c in CASES] + ["big_rows", "big_cols", "big_nc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp64", "fp16", "bf16"])
def test_matches_reference_cuda(kernels, name, shape, channel_dim, layout, dtype, with_b):
    kernels("cuda")
    check(inputs(shape, layout, dtype, "cuda", with_b), channel_dim, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_inputs_cpu(kernels, dtype):
    kernels("cpu")
    check(inputs((2, 5, 3, 4), "contiguous", dtype, "cpu"), 1, dtype, "half")


def test_twin_matches_naive_loop():
    """The twin itself against an explicit per-channel loop (float64)."""
    a, b, c, d = inputs((2, 3, 4, 5), "contiguous", torch.float64, "cpu")
    second, first = ref.channel_score_reduce(a, b, c, d, 1)
    for k in range(3):
        s2 = sum(float(a[n, k, i, j] * (b[n, k, i, j] - d[n, k, i, j]) + c[n, k, i, j] * d[n, k, i, j])
                 for n in range(2) for i in range(4) for j in range(5))
        s1 = sum(float(a[n, k, i, j] * d[n, k, i, j]) for n in range(2) for i in range(4) for j in range(5))
        assert abs(second[k].item() - s2) <= F64_SAME_FORMULA * abs(s2)
        assert abs(first[k].item() - s1) <= F64_SAME_FORMULA * abs(s1)


def test_add_accumulates(kernels, device):
    kernels(device)
    from oba_ext.ops import channel_score_reduce, channel_score_reduce_add_
    for dtype, acc_dtype in ((torch.float64, torch.float64), (torch.float32, torch.float64),
                             (torch.float32, torch.float32)):
        args = inputs((2, 4, 3, 3), "channels_last", dtype, device)
        s2, s1 = channel_score_reduce(*args, 1)
        acc2 = torch.full((4,), 0.5, dtype=acc_dtype, device=device)
        acc1 = torch.arange(4, dtype=acc_dtype, device=device)
        start2, start1 = acc2.clone(), acc1.clone()
        channel_score_reduce_add_(*args, 1, acc2, acc1)
        channel_score_reduce_add_(*args, 1, acc2, acc1)   # a layer called twice adds twice
        twin2, twin1 = start2.clone(), start1.clone()
        ref.channel_score_reduce_add_(*args, 1, twin2, twin1)
        ref.channel_score_reduce_add_(*args, 1, twin2, twin1)
        tol = F64_SAME_FORMULA if dtype == acc_dtype == torch.float64 else F32_ACCUMULATE
        assert_close_rel(acc2, start2 + 2 * s2.to(acc_dtype), "second acc", rtol=tol)
        assert_close_rel(acc1, start1 + 2 * s1.to(acc_dtype), "first acc", rtol=tol)
        assert_close_rel(acc2, twin2, "second acc vs twin", rtol=tol)
        assert_close_rel(acc1, twin1, "first acc vs twin", rtol=tol)


def test_add_strided_accumulator(kernels):
    kernels("cpu")
    from oba_ext.ops import channel_score_reduce, channel_score_reduce_add_
    args = inputs((3, 5, 2), "contiguous", torch.float64, "cpu")
    buf = torch.zeros(2, 5, dtype=torch.float64)
    acc2, acc1 = buf[0], torch.zeros(10, dtype=torch.float64)[::2]   # stride 2
    channel_score_reduce_add_(*args, 1, acc2, acc1)
    s2, s1 = channel_score_reduce(*args, 1)
    torch.testing.assert_close(acc2, s2, rtol=0, atol=0)
    torch.testing.assert_close(acc1, s1, rtol=0, atol=0)


def test_deterministic(kernels, device):
    """Bitwise the same result on every call, and (CPU) whatever the thread count: the chunks
    of the float64 accumulation do not depend on how many threads run them."""
    kernels(device)
    from oba_ext.ops import channel_score_reduce
    old = torch.get_num_threads()
    try:
        for layout in ("contiguous", "channels_last"):
            args = inputs((32, 16, 12, 12), layout, torch.float32, device)
            torch.set_num_threads(1)
            x2, x1 = channel_score_reduce(*args, 1)
            for n in ((1, 2, 3, 4) if device == "cpu" else (1,)):
                torch.set_num_threads(n)
                y2, y1 = channel_score_reduce(*args, 1)
                assert torch.equal(x2, y2) and torch.equal(x1, y1), (layout, n)
    finally:
        torch.set_num_threads(old)


def test_empty(kernels, device):
    kernels(device)
    from oba_ext.ops import channel_score_reduce, channel_score_reduce_add_
    a = torch.zeros(0, 3, 4, device=device)
    s2, s1 = channel_score_reduce(a, a, a, a, 1)
    assert s2.shape == (3,) and s1.shape == (3,) and not s2.any() and not s1.any()
    acc2, acc1 = torch.ones(3, device=device), torch.ones(3, device=device)
    channel_score_reduce_add_(a, None, a, a, 1, acc2, acc1)
    assert (acc2 == 1).all() and (acc1 == 1).all()
    e = torch.zeros(2, 0, 4, device=device)
    s2, s1 = channel_score_reduce(e, None, e, e, 1)
    assert s2.shape == (0,) and s1.shape == (0,)


@pytest.mark.parametrize("case", ["contiguous", "channels_last", "b_none", "last_dim"])
def test_opcheck(kernels, device, case):
    kernels(device)
    import oba_ext.ops  # noqa: F401  (registers the fakes)
    layout = "channels_last" if case == "channels_last" else "contiguous"
    shape, dim = ((2, 3, 4), -1) if case == "last_dim" else ((2, 3, 4, 5), 1)
    args = inputs(shape, layout, torch.float32, device, with_b=case != "b_none")
    torch.library.opcheck(torch.ops.oba_ext.channel_score_reduce.default, (*args, dim))
    acc = (torch.zeros(shape[dim], device=device), torch.zeros(shape[dim], device=device))
    torch.library.opcheck(torch.ops.oba_ext.channel_score_reduce_add_.default, (*args, dim, *acc))


def test_bad_arguments(kernels):
    kernels("cpu")
    from oba_ext.ops import channel_score_reduce, channel_score_reduce_add_
    a = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match=r"argument 'c' must have the shape of 'a'"):
        channel_score_reduce(a, a, torch.randn(2, 3, 5), a, 1)
    with pytest.raises(RuntimeError, match=r"argument 'b' must have the dtype of 'a'"):
        channel_score_reduce(a, a.double(), a, a, 1)
    with pytest.raises(RuntimeError, match=r"argument 'channel_dim' = 3 is out of range"):
        channel_score_reduce(a, a, a, a, 3)
    with pytest.raises(RuntimeError, match=r"argument 'a' must be float32, float64"):
        i = torch.ones(2, 3, dtype=torch.int64)
        channel_score_reduce(i, i, i, i, 1)
    with pytest.raises(RuntimeError, match=r"argument 'first_acc' must be 1-D of length 3"):
        channel_score_reduce_add_(a, a, a, a, 1, torch.zeros(3), torch.zeros(4))
    with pytest.raises(RuntimeError, match=r"argument 'second_acc' must be float32 or float64"):
        channel_score_reduce_add_(a, a, a, a, 1, torch.zeros(3, dtype=torch.float16), torch.zeros(3))
    with pytest.raises(RuntimeError, match=r"argument 'a' must be at least 1-D"):
        s = torch.tensor(1.0)
        channel_score_reduce(s, s, s, s, 0)
