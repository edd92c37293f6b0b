"""attention_two_stream_forward / attention_second_order_backward kernels (CPU and CUDA)
against their pure-PyTorch twins (oba_ext/reference/attention.py, themselves checked against
autograd in tests/test_attention_reference.py), plus opcheck and argument errors.

Tolerance rule (tests/tolerances.py): float64 ≤ 1e-10 relative; lower precisions at most 2×
the twin's error in the same dtype (up to the rule's sampling allowance), both against the
float64 twin.
"""
import pytest
import torch

from oba_ext.ops import attention as ops
from oba_ext.reference import attention as ref
from tolerances import assert_matches

FWD_NAMES = ("O", "O_dot", "lse")
BWD_NAMES = ("G_Q", "G_K", "G_V", "C_Q", "C_K", "C_V")

# B, H, N_q, N_k, D, D_v
SHAPES = [
    (2, 3, 1, 1, 32, 32),
    (2, 2, 7, 7, 64, 64),
    (1, 3, 7, 9, 80, 80),
    (1, 2, 129, 129, 32, 32),
    (2, 2, 129, 7, 80, 64),
    (1, 1, 1024, 1024, 32, 32),
]


def _ids(c):
    return "x".join(map(str, c))


def make_inputs(shape, dtype, device, seed=0, layout="contiguous"):
    """q, k, v, tangents, G_O, C_O (values drawn in float64, then rounded to `dtype`).

    layout "bnhd": tensors are (B, N, H, D) in memory, transposed to (B, H, N, D), as the
    q/k/v of an SDPA call that reshaped a qkv projection."""
    B, H, Nq, Nk, D, Dv = shape
    g = torch.Generator().manual_seed(seed)

    def r(n, d):
        t = torch.randn(B, n, H, d, generator=g, dtype=torch.float64)
        t = t.transpose(1, 2) if layout == "bnhd" else t.transpose(1, 2).contiguous()
        return t.to(device=device, dtype=dtype)
    q, k, v = r(Nq, D), r(Nk, D), r(Nk, Dv)
    qd, kd, vd = r(Nq, D), r(Nk, D), r(Nk, Dv)
    go, co = r(Nq, Dv), r(Nq, Dv)
    return q, k, v, qd, kd, vd, go, co


def make_mask(kind, shape, device, seed=1):
    B, H, Nq, Nk = shape[:4]
    g = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "bool":  # (B, 1, N_q, N_k); key 0 always visible
        m = torch.rand(B, 1, Nq, Nk, generator=g) > 0.3
        m[..., 0] = True
        return m.to(device)
    return torch.randn(Nq, Nk, generator=g, dtype=torch.float64).to(device)  # additive, 2-D


def up(t):
    return None if t is None else t.to(torch.float64)


def check_all(outs, ref64, twin, dtype, names, what):
    for name, o, r, t in zip(names, outs, ref64, twin):
        # the documented dtypes (oba_ext/ops/attention.py): outputs in the inputs' dtype, the
        # log-sum-exp in float32 (float64 for float64 inputs) — for the kernel and its twin
        want = (torch.float64 if dtype == torch.float64 else torch.float32) if name == "lse" else dtype
        assert o.dtype == want and t.dtype == want, (name, o.dtype, t.dtype, want)
        assert_matches(o, r, t, dtype=dtype, what=f"{what} {name}")


def run_case(shape, dtype, device, mask_kind, causal, exact, layout="contiguous", drop=()):
    q, k, v, qd, kd, vd, go, co = make_inputs(shape, dtype, device, layout=layout)
    tang = {"q_dot": qd, "k_dot": kd, "v_dot": vd, "C_O": co}
    for name in drop:
        tang[name] = None
    qd, kd, vd, co = tang["q_dot"], tang["k_dot"], tang["v_dot"], tang["C_O"]
    mask = make_mask(mask_kind, shape, device)
    m64 = mask if mask is None or mask.dtype == torch.bool else mask.double()
    what = f"{shape} {mask_kind} causal={causal} exact={exact} {layout} drop={drop}"
    args64 = [up(t) for t in (q, k, v, qd, kd, vd)]
    f64 = ref.attention_two_stream_forward(*args64, m64, causal, None)
    fk = ops.attention_two_stream_forward(q, k, v, qd, kd, vd, mask, causal, None)
    ft = ref.attention_two_stream_forward(q, k, v, qd, kd, vd, mask, causal, None)
    assert fk[2].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    check_all(fk, f64, ft, dtype, FWD_NAMES, what)
    b64 = ref.attention_second_order_backward(*args64, up(go), up(co), m64, causal, None, f64[2],
                                              exact)
    bk = ops.attention_second_order_backward(q, k, v, qd, kd, vd, go, co, mask, causal, None,
                                             fk[2], exact)
    bt = ref.attention_second_order_backward(q, k, v, qd, kd, vd, go, co, mask, causal, None,
                                             ft[2], exact)
    check_all(bk, b64, bt, dtype, BWD_NAMES, what)


def dtypes_for(device):
    if device == "cpu":
        return [torch.float64, torch.float32]
    return [torch.float64, torch.float32, torch.float16, torch.bfloat16]


MASKINGS = {"nomask": (None, False), "bool": ("bool", False), "add": ("add", False),
            "causal": (None, True), "add+causal": ("add", True)}
# every shape with every masking, except N=1024 which runs unmasked and causal only (CPU time)
KERNEL_CASES = [pytest.param(shape, *mc, id=f"{_ids(shape)}-{mid}")
                for shape in SHAPES for mid, mc in MASKINGS.items()
                if shape[2] != 1024 or mc[0] is None]


@pytest.mark.parametrize("shape,mask_kind,causal", KERNEL_CASES)
def test_kernel_matches_twin(shape, mask_kind, causal, device, kernels):
    kernels(device)
    for dtype in dtypes_for(device):
        for exact in (False, True):
            run_case(shape, dtype, device, mask_kind, causal, exact)


@pytest.mark.parametrize("drop", [("q_dot", "k_dot", "v_dot", "C_O"), ("v_dot",), ("q_dot",),
                                  ("k_dot", "C_O")], ids=lambda d: "-".join(d))
def test_absent_tangents(drop, device, kernels):
    kernels(device)
    for dtype in dtypes_for(device):
        run_case((2, 2, 9, 11, 32, 32), dtype, device, "bool", False, True, drop=drop)


def test_strided_inputs(device, kernels):
    """q/k/v as transposed views of (B, N, H, D) buffers (what a qkv reshape produces)."""
    kernels(device)
    for dtype in dtypes_for(device):
        run_case((2, 3, 17, 17, 64, 64), dtype, device, "add", True, True, layout="bnhd")


def test_many_row_blocks(kernels):
    """The CPU kernel splits N_q into row blocks of 2^16 / (H_q/H_kv · N_k) rows: 32 per block
    here (other block geometries: tests/test_attention_blocks.py)."""
    kernels("cpu")
    run_case((1, 2, 600, 2048, 32, 32), torch.float64, "cpu", "bool", True, True)


@pytest.mark.cuda
@pytest.mark.parametrize("D", [16, 32, 64, 80, 128, 256])
def test_cuda_head_dims(D, kernels):
    kernels("cuda")
    for dtype in dtypes_for("cuda"):
        run_case((2, 2, 65, 33, D, D), dtype, "cuda", "bool", False, True)


@pytest.mark.cuda
def test_cuda_long_sequence(kernels):
    kernels("cuda")
    for dtype in (torch.float32, torch.bfloat16):
        run_case((1, 2, 2048, 2048, 64, 64), dtype, "cuda", None, True, True)


def test_fully_masked_rows(device, kernels):
    """Rows with no visible key: O = Ȯ = 0, lse = −inf, zero gradients (like the twin)."""
    kernels(device)
    q, k, v, qd, kd, vd, go, co = make_inputs((1, 2, 5, 6, 32, 32), torch.float64, device)
    mask = torch.ones(5, 6, dtype=torch.bool, device=device)
    mask[2] = False
    o, od, lse = ops.attention_two_stream_forward(q, k, v, qd, kd, vd, mask, False, None)
    assert torch.isneginf(lse[:, :, 2]).all()
    assert (o[:, :, 2] == 0).all() and (od[:, :, 2] == 0).all()
    out = ops.attention_second_order_backward(q, k, v, qd, kd, vd, go, co, mask, False, None, lse,
                                              True)
    twin = ref.attention_second_order_backward(q, k, v, qd, kd, vd, go, co, mask, False, None,
                                               lse, True)
    for name, a, b in zip(BWD_NAMES, out, twin):
        assert torch.isfinite(a).all(), name
        assert_matches(a, b, what=name)


def test_scale_and_lse_default(device, kernels):
    kernels(device)
    q, k, v, qd, kd, vd, go, co = make_inputs((1, 2, 6, 6, 32, 32), torch.float64, device)
    fk = ops.attention_two_stream_forward(q, k, v, qd, kd, vd, None, False, 0.3)
    ft = ref.attention_two_stream_forward(q, k, v, qd, kd, vd, None, False, 0.3)
    check_all(fk, ft, ft, torch.float64, FWD_NAMES, "scale=0.3")
    bk = ops.attention_second_order_backward(q, k, v, qd, kd, vd, go, co, None, False, 0.3)
    bt = ref.attention_second_order_backward(q, k, v, qd, kd, vd, go, co, None, False, 0.3)
    check_all(bk, bt, bt, torch.float64, BWD_NAMES, "scale=0.3, lse=None")


@pytest.mark.parametrize("mask_kind", [None, "bool"])
def test_opcheck(mask_kind, device, kernels):
    kernels(device)
    q, k, v, qd, kd, vd, go, co = make_inputs((1, 2, 5, 7, 32, 32), torch.float64, device)
    mask = make_mask(mask_kind, (1, 2, 5, 7), device)
    fwd = torch.ops.oba_ext.attention_two_stream_forward
    bwd = torch.ops.oba_ext.attention_second_order_backward
    torch.library.opcheck(fwd, (q, k, v, qd, kd, vd, mask, False, None))
    torch.library.opcheck(fwd, (q, k, v, None, None, None, mask, True, 0.5))
    lse = fwd(q, k, v, None, None, None, mask, False, None)[2]
    torch.library.opcheck(bwd, (q, k, v, qd, kd, vd, go, co, mask, False, None, lse, True))
    torch.library.opcheck(bwd, (q, k, v, None, kd, None, go, None, mask, False, None, lse, False))


def test_bad_arguments(kernels):
    kernels("cpu")
    q, k, v, qd, kd, vd, go, co = make_inputs((1, 2, 5, 7, 32, 32), torch.float64, "cpu")
    f = ops.attention_two_stream_forward
    with pytest.raises(RuntimeError, match="q must be 4-D"):
        f(q[0], k, v, None, None, None)
    with pytest.raises(RuntimeError, match="k must have shape"):
        f(q, k[..., :16], v, None, None, None)
    with pytest.raises(RuntimeError, match="v must have q's dtype"):
        f(q, k, v.float(), None, None, None)
    with pytest.raises(RuntimeError, match="q_dot must have shape"):
        f(q, k, v, k, None, None)
    with pytest.raises(RuntimeError, match="mask must be broadcastable"):
        f(q, k, v, None, None, None, torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="mask must be bool"):
        f(q, k, v, None, None, None, torch.ones(5, 7, dtype=torch.long))
    with pytest.raises(RuntimeError, match="float32/float64"):
        f(q.half(), k.half(), v.half(), None, None, None)
    lse = f(q, k, v, None, None, None)[2]
    b = ops.attention_second_order_backward
    with pytest.raises(RuntimeError, match="lse must be Double"):
        b(q, k, v, None, None, None, go, None, None, False, None, lse.float(), False)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        b(q, k, v, None, None, None, go, None, None, False, None, lse[:, :, :3], False)
    with pytest.raises(RuntimeError, match="G_O must have shape"):
        b(q, k, v, None, None, None, go[:, :, :3], None, None, False, None, lse, False)
