"""linear_weight_score / conv_weight_score kernels vs their pure-PyTorch twins
(oba_ext/reference/weight.py), and the twins vs naive oracles (SPEC §5 per-weight scores)."""
import pytest
import torch
from torch.nn import functional as F

from oba_ext.reference import weight as ref
from tolerances import F64_SAME_FORMULA, assert_close_rel, assert_matches


def rand(*shape, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def up(ts):
    return [t.to(torch.float64) for t in ts]


@pytest.fixture
def no_tf32():
    """float32 GEMM/conv in true float32 on CUDA: cuDNN convolutions default to TF32 (10-bit
    mantissa), which would make the float32 comparison measure TF32 rounding of two different
    algorithm choices rather than the kernels."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# ---------------------------------------------------------------- linear

# (name, C_out, C_in, leading dims per stream, n streams, non-contiguous inputs)
LINEAR_CASES = [
    ("one_stream", 3, 5, (4,), 1, False),
    ("two_streams", 3, 5, (4,), 2, False),
    ("tokens", 129, 3, (2, 7), 2, False),
    ("c1", 1, 129, (3,), 2, False),
    ("rows1", 5, 1, (1,), 2, False),
    ("noncontig", 6, 4, (5,), 2, True),
    ("noncontig_tokens", 3, 129, (2, 3), 2, True),
]


def linear_inputs(c_out, c_in, lead, n, noncontig, dtype, device):
    w = rand(c_out, c_in, dtype=dtype, device=device, seed=1)
    grads, inputs = [], []
    for k in range(n):
        if noncontig:  # transposed views with the right logical shape
            g = rand(c_out, *lead, dtype=dtype, device=device, seed=10 + k).movedim(0, -1)
            x = rand(c_in, *lead, dtype=dtype, device=device, seed=20 + k).movedim(0, -1)
            assert not g.is_contiguous() or c_out == 1
        else:
            g = rand(*lead, c_out, dtype=dtype, device=device, seed=10 + k)
            x = rand(*lead, c_in, dtype=dtype, device=device, seed=20 + k)
        grads.append(g)
        inputs.append(x)
    return w, grads, inputs


def check_linear(w, grads, inputs, dtype, what):
    from oba_ext.ops import linear_weight_score
    out = linear_weight_score(w, grads, inputs)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.is_contiguous()
    ref64 = ref.linear_weight_score(w.to(torch.float64), up(grads), up(inputs))
    twin = ref.linear_weight_score(w, grads, inputs)
    assert_matches(out, ref64, twin, dtype, what=what)


@pytest.mark.parametrize("case", LINEAR_CASES, ids=[c[0] for c in LINEAR_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_linear_matches_reference_cpu(kernels, case, dtype):
    kernels("cpu")
    name, *spec = case
    check_linear(*linear_inputs(*spec, dtype, "cpu"), dtype, name)


@pytest.mark.cuda
@pytest.mark.parametrize("case", LINEAR_CASES + [("big", 257, 129, (33, 17), 2, False)],
                         ids=[c[0] for c in LINEAR_CASES] + ["big"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp64", "fp16", "bf16"])
def test_linear_matches_reference_cuda(kernels, no_tf32, case, dtype):
    kernels("cuda")
    name, *spec = case
    check_linear(*linear_inputs(*spec, dtype, "cuda"), dtype, name)


def test_linear_twin_matches_naive():
    w, grads, inputs = linear_inputs(3, 4, (2, 3), 2, False, torch.float64, "cpu")
    want = torch.zeros(3, 4, dtype=torch.float64)
    for g, x in zip(grads, inputs):
        for n in range(2):
            for t in range(3):
                want += torch.outer(g[n, t], x[n, t])
    assert_close_rel(ref.linear_weight_score(w, grads, inputs), w * want, "linear twin vs loop",
                     rtol=F64_SAME_FORMULA)


# ---------------------------------------------------------------- conv

# (name, w shape, batch per stream, spatial in, stride, padding, dilation, groups, channels_last)
CONV_CASES = [
    ("conv2d", (4, 3, 3, 3), (2, 3), (6, 5), (1, 1), (1, 1), (1, 1), 1, False),
    ("conv2d_stride_dil", (5, 3, 3, 2), (2, 1), (9, 8), (2, 1), (1, 0), (2, 1), 1, False),
    ("conv2d_groups", (6, 2, 3, 3), (2, 2), (5, 5), (1, 1), (1, 1), (1, 1), 2, False),
    ("depthwise", (3, 1, 3, 3), (1, 2), (7, 6), (1, 2), (1, 1), (1, 1), 3, False),
    ("channels_last", (4, 3, 3, 3), (2, 3), (6, 5), (1, 1), (1, 1), (1, 1), 1, True),
    ("c_out129_1x1", (129, 3, 1, 1), (2,), (3, 3), (1, 1), (0, 0), (1, 1), 1, False),
    ("conv1d", (4, 3, 3), (2, 3), (9,), (1,), (1,), (1,), 1, False),
    ("conv1d_groups_stride", (6, 1, 5), (2, 1), (17,), (2,), (2,), (1,), 3, False),
    ("conv1d_one_stream", (1, 129, 1), (3,), (4,), (1,), (0,), (1,), 1, False),
]


def conv_inputs(wshape, batches, spatial, stride, padding, dilation, groups, channels_last, dtype, device):
    conv = {3: F.conv1d, 4: F.conv2d}[len(wshape)]
    w = rand(*wshape, dtype=dtype, device=device, seed=1)
    c_in = wshape[1] * groups
    grads, inputs = [], []
    for k, n in enumerate(batches):
        x = rand(n, c_in, *spatial, dtype=dtype, device=device, seed=20 + k)
        out_shape = conv(x.to(torch.float64), w.to(torch.float64), None, stride, padding, dilation, groups).shape
        g = rand(*out_shape, dtype=dtype, device=device, seed=10 + k)
        if channels_last:
            x, g = x.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
        grads.append(g)
        inputs.append(x)
    if channels_last:
        w = w.contiguous(memory_format=torch.channels_last)
    return w, grads, inputs, list(stride), list(padding), list(dilation), groups


def check_conv(w, grads, inputs, stride, padding, dilation, groups, dtype, what):
    from oba_ext.ops import conv_weight_score
    out = conv_weight_score(w, grads, inputs, stride, padding, dilation, groups)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == w.shape and out.is_contiguous()
    ref64 = ref.conv_weight_score(w.to(torch.float64), up(grads), up(inputs), stride, padding, dilation, groups)
    twin = ref.conv_weight_score(w, grads, inputs, stride, padding, dilation, groups)
    assert_matches(out, ref64, twin, dtype, what=what)


@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_conv_matches_reference_cpu(kernels, case, dtype):
    kernels("cpu")
    name, *spec = case
    check_conv(*conv_inputs(*spec, dtype, "cpu"), dtype, name)


@pytest.mark.cuda
@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp64", "fp16", "bf16"])
def test_conv_matches_reference_cuda(kernels, no_tf32, case, dtype):
    kernels("cuda")
    name, *spec = case
    check_conv(*conv_inputs(*spec, dtype, "cuda"), dtype, name)


def naive_conv2d_wgrad(g, x, wshape, stride, padding, dilation, groups):
    """Σ over batch and output positions of g[n, o, p, q] · x_pad[n, cin, p*s + i*d, q*s + j*d]."""
    c_out, cpg, kh, kw = wshape
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    out = torch.zeros(wshape, dtype=torch.float64)
    opg = c_out // groups
    for o in range(c_out):
        grp = o // opg
        for ci in range(cpg):
            for i in range(kh):
                for j in range(kw):
                    rows = xp[:, grp * cpg + ci, i * dilation[0]::stride[0], j * dilation[1]::stride[1]]
                    rows = rows[:, :g.shape[2], :g.shape[3]]
                    out[o, ci, i, j] = (g[:, o] * rows).sum()
    return out


@pytest.mark.parametrize("case", [c for c in CONV_CASES if len(c[1]) == 4], ids=lambda c: c[0])
def test_conv_twin_matches_naive(case):
    _, *spec = case
    w, grads, inputs, stride, padding, dilation, groups = conv_inputs(*spec, torch.float64, "cpu")
    want = sum(naive_conv2d_wgrad(g, x, tuple(w.shape), stride, padding, dilation, groups)
               for g, x in zip(grads, inputs))
    got = ref.conv_weight_score(w, grads, inputs, stride, padding, dilation, groups)
    assert_close_rel(got, w * want, "conv twin vs loop", rtol=F64_SAME_FORMULA)


# ---------------------------------------------------------------- shared

def test_empty_batch_gives_zeros(kernels, device):
    kernels(device)
    from oba_ext.ops import conv_weight_score, linear_weight_score
    w = rand(3, 4, device=device)
    out = linear_weight_score(w, [torch.zeros(0, 3, device=device, dtype=torch.float64)],
                              [torch.zeros(0, 4, device=device, dtype=torch.float64)])
    assert out.shape == (3, 4) and not out.any()
    wc = rand(2, 3, 3, 3, device=device, dtype=torch.float32)
    out = conv_weight_score(wc, [torch.zeros(0, 2, 4, 4, device=device)], [torch.zeros(0, 3, 4, 4, device=device)],
                            [1, 1], [1, 1], [1, 1], 1)
    assert out.shape == wc.shape and out.dtype == torch.float32 and not out.any()


def test_opcheck(kernels, device):
    kernels(device)
    import oba_ext.ops  # noqa: F401  (registers the fakes)
    w, grads, inputs = linear_inputs(3, 5, (2, 3), 2, True, torch.float32, device)
    torch.library.opcheck(torch.ops.oba_ext.linear_weight_score.default, (w, grads, inputs))
    for case in (CONV_CASES[2], CONV_CASES[4], CONV_CASES[7]):
        w, grads, inputs, *rest = conv_inputs(*case[1:], torch.float32, device)
        torch.library.opcheck(torch.ops.oba_ext.conv_weight_score.default, (w, grads, inputs, *rest))


def test_bad_arguments(kernels):
    kernels("cpu")
    from oba_ext.ops import conv_weight_score, linear_weight_score
    w = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"'grads' and 'inputs' must have the same length"):
        linear_weight_score(w, [torch.randn(2, 3)], [])
    with pytest.raises(RuntimeError, match=r"argument 'inputs\[1\]' must have shape \[\.\.\., C_in\] with C_in = 4"):
        linear_weight_score(w, [torch.randn(2, 3)] * 2, [torch.randn(2, 4), torch.randn(2, 5)])
    with pytest.raises(RuntimeError, match=r"must share their leading dims"):
        linear_weight_score(w, [torch.randn(2, 3)], [torch.randn(3, 4)])
    with pytest.raises(RuntimeError, match=r"argument 'grads\[0\]' must have the dtype of 'w'"):
        linear_weight_score(w, [torch.randn(2, 3, dtype=torch.float64)], [torch.randn(2, 4)])
    with pytest.raises(RuntimeError, match=r"argument 'w' must be a 2-D"):
        linear_weight_score(torch.randn(3), [torch.randn(2, 3)], [torch.randn(2, 3)])
    wc = torch.randn(4, 3, 3, 3)
    x, g = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 6, 6)
    with pytest.raises(RuntimeError, match=r"argument 'grads\[0\]' has spatial size"):
        conv_weight_score(wc, [g], [x], [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match=r"argument 'stride' must have 1 or 2 entries"):
        conv_weight_score(wc, [g], [x], [1, 1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match=r"argument 'inputs\[0\]' must have shape \[N, C_in = 6"):
        conv_weight_score(wc, [g], [x], [1, 1], [1, 1], [1, 1], 2)
    with pytest.raises(RuntimeError, match=r"argument 'w' must be a Conv1d/Conv2d weight"):
        conv_weight_score(torch.randn(4, 3, 3, 3, 3), [g], [x], [1], [1], [1], 1)
