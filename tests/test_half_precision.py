"""float16/bfloat16 inputs: products and stream accumulation in float32, scores in float32
(issue 11, ask 4).

The sizes are chosen so that the old behaviour — the weight-gradient product of each stream
rounded to 16 bits and the streams summed in 16 bits, or per-element channel products rounded to
16 bits — loses more than 1e-2 relative: the two streams nearly cancel (the second-order sum
``GᵀT + CᵀX`` with ``C = −G``, ``X ≈ T``). Each test also computes the old way and asserts that it
would fail, so the check keeps its teeth. The reference is float64 on the same (rounded) inputs.
"""
import pytest
import torch
from torch.nn import functional as F

from oba_ext.reference import channel as ref_channel
from oba_ext.reference import weight as ref_weight
from tolerances import HALF_16BIT_ACCUMULATION_LOSS as OLD_LOSS
from tolerances import HALF_INPUT_FLOAT32_RTOL, rel_err

HALF = [torch.float16, torch.bfloat16]
IDS = ["fp16", "bf16"]


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def up(ts):
    return [t.to(torch.float64) for t in ts]


def cancelling_streams(shape_g, shape_x, dtype):
    """grads = [G, −G], inputs = [T, T + 1e-2·noise], all rounded to `dtype`."""
    g = randn(*shape_g, seed=1).to(dtype)
    t = randn(*shape_x, seed=2)
    x = (t + 1e-2 * randn(*shape_x, seed=3)).to(dtype)
    return [g, -g], [t.to(dtype), x]


def check_scores(out, want64, what):
    assert out.dtype == torch.float32, f"{what}: scores must be float32, got {out.dtype}"
    err = rel_err(out, want64)
    assert err <= HALF_INPUT_FLOAT32_RTOL, f"{what}: relative error {err:.3e} > {HALF_INPUT_FLOAT32_RTOL:.0e}"


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_linear_weight_score_half(kernels, dtype):
    kernels("cpu")
    from oba_ext.ops import linear_weight_score
    w = randn(6, 5, seed=4).to(dtype)
    grads, inputs = cancelling_streams((4096, 6), (4096, 5), dtype)
    want = ref_weight.linear_weight_score(w.double(), up(grads), up(inputs))
    # the old way: each stream's product rounded to 16 bits, the streams summed in 16 bits
    old = sum(torch.mm(g.t(), x) for g, x in zip(grads, inputs)).float() * w.float()
    assert rel_err(old, want) > OLD_LOSS, "the size no longer separates 16-bit accumulation"
    check_scores(linear_weight_score(w, grads, inputs), want, "linear_weight_score")
    check_scores(ref_weight.linear_weight_score(w, grads, inputs), want, "linear twin")


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_conv_weight_score_half(kernels, dtype):
    kernels("cpu")
    from oba_ext.ops import conv_weight_score
    w = randn(4, 3, 3, 3, seed=5).to(dtype)
    grads, inputs = cancelling_streams((16, 4, 16, 16), (16, 3, 16, 16), dtype)
    geo = ([1, 1], [1, 1], [1, 1], 1)
    want = ref_weight.conv_weight_score(w.double(), up(grads), up(inputs), *geo)

    def wgrad16(g, x):  # the old twin: the autograd weight gradient in the 16-bit dtype
        wv = w.detach().requires_grad_(True)
        with torch.enable_grad():
            y = F.conv2d(x, wv, None, 1, 1)
            return torch.autograd.grad(y, wv, grad_outputs=g)[0]

    old = sum(wgrad16(g, x) for g, x in zip(grads, inputs)).float() * w.float()
    assert rel_err(old, want) > OLD_LOSS, "the size no longer separates 16-bit accumulation"
    check_scores(conv_weight_score(w, grads, inputs, *geo), want, "conv_weight_score")
    check_scores(ref_weight.conv_weight_score(w, grads, inputs, *geo), want, "conv twin")


def cancelling_channel_args(dtype):
    """a⊙(b−d) + c⊙d with c = −a and b = 2d + 1e-2·noise: the result is Σ a⊙(noise), about 1e-2
    of each term, so per-element 16-bit products lose ~5e-2 (float16) or more (bfloat16)."""
    shape = (64, 5, 16, 16)
    a = randn(*shape, seed=6).to(dtype)
    d = randn(*shape, seed=7).to(dtype)
    b = (2 * d.double() + 1e-2 * randn(*shape, seed=8)).to(dtype)
    return a, b, -a, d


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_channel_score_reduce_half(kernels, dtype):
    kernels("cpu")
    from oba_ext.ops import channel_score_reduce
    a, b, c, d = cancelling_channel_args(dtype)
    want2, want1 = ref_channel.channel_score_reduce(a.double(), b.double(), c.double(), d.double(), 1)
    dims = [0, 2, 3]
    old = (a * (b - d) + c * d).sum(dims, dtype=torch.float32)  # the old twin: 16-bit products
    assert rel_err(old, want2) > OLD_LOSS, "the size no longer separates 16-bit products"
    for what, (s2, s1) in (("kernel", channel_score_reduce(a, b, c, d, 1)),
                           ("twin", ref_channel.channel_score_reduce(a, b, c, d, 1)),
                           ("emulated CUDA kernel",
                            torch.ops.oba_ext._emulate_channel_score_reduce_cuda.default(
                                a, b, c, d, 1, 132, 0))):
        check_scores(s2, want2, f"channel second ({what})")
        check_scores(s1, want1, f"channel first ({what})")


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_channel_first_order_reduce_half(kernels, dtype):
    """The first-order sum Σ a⊙d with a⊙d summing to ~1e-2 of Σ|a⊙d| (a = noise-perturbed
    alternating signs)."""
    kernels("cpu")
    from oba_ext.ops import channel_first_order_reduce
    a, _, _, d = cancelling_channel_args(dtype)
    # pair each element with a near-negative twin: a' = [a, −a + 1e-2·noise] along dim 0
    a2 = torch.cat([a, (-a.double() + 1e-2 * randn(*a.shape, seed=9)).to(dtype)])
    d2 = torch.cat([d, d])
    want = ref_channel.channel_first_order_reduce(a2.double(), d2.double(), 1)
    old = (a2 * d2).sum([0, 2, 3], dtype=torch.float32)
    assert rel_err(old, want) > OLD_LOSS, "the size no longer separates 16-bit products"
    check_scores(channel_first_order_reduce(a2, d2, 1), want, "first-order kernel")
    check_scores(ref_channel.channel_first_order_reduce(a2, d2, 1), want, "first-order twin")
    check_scores(torch.ops.oba_ext._emulate_channel_first_order_reduce_cuda.default(a2, d2, 1, 132, 0),
                 want, "first-order emulated CUDA kernel")
