"""The first-order entry point and the optional ``c`` of the channel ops (issue 14, "tricks
instead of interfaces"): ``channel_first_order_reduce(a, d, dim) = Σ a⊙d`` and
``channel_score_reduce(a, b, None, d, dim)`` (c ≡ 0) against their twins and a float64 loop,
opcheck, and the engine's registry using them.
"""
import pytest
import torch

from oba_ext.engine import kernels as engine_kernels
from oba_ext.reference import channel as ref
from tolerances import assert_close_rel, assert_matches

SHAPES = [((2, 3, 5, 4), 1, "contiguous"), ((2, 3, 5, 4), 1, "channels_last"),
          ((4, 7, 33), -1, "contiguous"), ((129,), 0, "contiguous"), ((5, 3), 0, "contiguous")]
IDS = ["nchw", "nhwc", "ntc", "1d", "dim0"]


def make(shape, layout, dtype, device, seed):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    t = t.to(dtype=dtype, device=device)
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t


def test_twin_first_order_is_the_plain_sum():
    a, d = make((3, 4, 5), "contiguous", torch.float64, "cpu", 1), make((3, 4, 5), "contiguous", torch.float64, "cpu", 2)
    want = torch.tensor([sum(float(a[n, k, i] * d[n, k, i]) for n in range(3) for i in range(5))
                         for k in range(4)], dtype=torch.float64)
    assert_close_rel(ref.channel_first_order_reduce(a, d, 1), want, "twin first-order")
    b, c = make((3, 4, 5), "contiguous", torch.float64, "cpu", 3), make((3, 4, 5), "contiguous", torch.float64, "cpu", 4)
    s2, s1 = ref.channel_score_reduce(a, b, None, d, 1)
    want2 = torch.tensor([sum(float(a[n, k, i] * (b[n, k, i] - d[n, k, i])) for n in range(3)
                              for i in range(5)) for k in range(4)], dtype=torch.float64)
    assert_close_rel(s2, want2, "twin second with c=None")
    assert_close_rel(s1, want, "twin first with c=None")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16],
                         ids=["fp64", "fp32", "fp16"])
@pytest.mark.parametrize("shape,dim,layout", SHAPES, ids=IDS)
def test_first_order_kernel_vs_twin(kernels, device, shape, dim, layout, dtype):
    kernels(device)
    from oba_ext.ops import channel_first_order_reduce
    a, d = (make(shape, layout, dtype, device, s) for s in (1, 2))
    out = channel_first_order_reduce(a, d, dim)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want = ref.channel_first_order_reduce(a.double(), d.double(), dim)
    assert_matches(out, want, ref.channel_first_order_reduce(a, d, dim), dtype, what="first-order")


@pytest.mark.parametrize("with_b", [True, False], ids=["b", "b_none"])
@pytest.mark.parametrize("shape,dim,layout", SHAPES, ids=IDS)
def test_c_none_kernel_vs_twin(kernels, device, shape, dim, layout, with_b):
    kernels(device)
    from oba_ext.ops import channel_score_reduce
    a, b, d = (make(shape, layout, torch.float64, device, s) for s in (1, 2, 3))
    b = b if with_b else None
    s2, s1 = channel_score_reduce(a, b, None, d, dim)
    r2, r1 = ref.channel_score_reduce(a, b, None, d, dim)
    assert_close_rel(s2, r2, "second with c=None")
    assert_close_rel(s1, r1, "first with c=None")


def test_engine_passes_c_none_and_first_order_through(kernels):
    """The registry functions take c=None and the first-order op directly (no a-as-c trick)."""
    kernels("cpu")
    assert "channel_first_order_reduce" in engine_kernels.which("cpu")
    a, b, d = (make((2, 3, 4), "contiguous", torch.float64, "cpu", s) for s in (1, 2, 3))
    s2, s1 = engine_kernels.channel_score_reduce(a, b, None, d, 1)
    r2, r1 = ref.channel_score_reduce(a, b, None, d, 1)
    assert_close_rel(s2, r2, "engine second with c=None")
    assert_close_rel(s1, r1, "engine first with c=None")
    assert_close_rel(engine_kernels.channel_first_order_reduce(a, d, 1), r1, "engine first-order")


@pytest.mark.parametrize("case", ["contiguous", "channels_last", "last_dim"])
def test_opcheck(kernels, device, case):
    kernels(device)
    import oba_ext.ops  # noqa: F401  (registers the fakes)
    layout = "channels_last" if case == "channels_last" else "contiguous"
    shape, dim = ((2, 3, 4), -1) if case == "last_dim" else ((2, 3, 4, 5), 1)
    a, b, d = (make(shape, layout, torch.float32, device, s) for s in (1, 2, 3))
    torch.library.opcheck(torch.ops.oba_ext.channel_first_order_reduce.default, (a, d, dim))
    torch.library.opcheck(torch.ops.oba_ext.channel_score_reduce.default, (a, b, None, d, dim))
    torch.library.opcheck(torch.ops.oba_ext.channel_score_reduce.default, (a, None, None, d, dim))
    acc = (torch.zeros(shape[dim], device=device), torch.zeros(shape[dim], device=device))
    torch.library.opcheck(torch.ops.oba_ext.channel_score_reduce_add_.default,
                          (a, b, None, d, dim, *acc))


def test_first_order_bad_arguments(kernels):
    kernels("cpu")
    from oba_ext.ops import channel_first_order_reduce
    a = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match=r"channel_first_order_reduce: argument 'd' must have the shape of 'a'"):
        channel_first_order_reduce(a, torch.randn(2, 3, 5), 1)
    with pytest.raises(RuntimeError, match=r"channel_first_order_reduce: argument 'd' must have the dtype of 'a'"):
        channel_first_order_reduce(a, a.double(), 1)
    with pytest.raises(RuntimeError, match=r"channel_first_order_reduce: argument 'channel_dim' = 3 is out of range"):
        channel_first_order_reduce(a, a, 3)
    with pytest.raises(RuntimeError, match=r"channel_first_order_reduce: argument 'a' must be float32"):
        channel_first_order_reduce(a.int(), a.int(), 1)


def test_first_order_empty(kernels, device):
    kernels(device)
    from oba_ext.ops import channel_first_order_reduce
    e = torch.zeros(0, 3, 4, device=device)
    out = channel_first_order_reduce(e, e, 1)
    assert out.shape == (3,) and out.dtype == torch.float32 and not out.any()
