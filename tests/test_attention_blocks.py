"""The shared attention host routine (csrc/common/attention_blocks.h) and its fused row pass
(csrc/common/attention_rows.h) on the CPU, against the float64 twins
(oba_ext/reference/attention.py).

The CUDA kernels run the same host routine and the same __host__ __device__ row functions;
``torch.ops.oba_ext._attention_{forward,backward}_config`` run them on the CPU with a chosen
block budget and, with ``emulate_warp``, in the CUDA row kernel's own decomposition (32
lanes, lane l on columns j ≡ l mod 32, row sums by an emulated xor butterfly). So an indexing
or recurrence bug in the device arithmetic, the block geometry (groups × rows, grouped-query
heads, masks read through strides, causal bounds) or the lane loops fails here without a GPU.
"""
import pytest
import torch

from oba_ext.ops import attention as ops
from oba_ext.reference import attention as ref
from tolerances import WARP_VS_SERIAL_ATOL, WARP_VS_SERIAL_RTOL, assert_matches

FWD = ("O", "O_dot", "lse")
BWD = ("G_Q", "G_K", "G_V", "C_Q", "C_K", "C_V")

# B, H, H_kv, N_q, N_k, D, D_v: awkward sizes (N = 1, 7, 33 > one warp, 129), grouped-query
SHAPES = [
    (2, 3, 3, 1, 1, 32, 32),
    (2, 2, 2, 7, 7, 64, 64),
    (1, 3, 3, 7, 9, 80, 80),
    (2, 4, 2, 33, 33, 16, 24),
    (1, 6, 2, 129, 40, 8, 8),
    (3, 2, 1, 17, 129, 32, 16),
]
# score elements per block: one row per block, rows split inside a group, several groups
BLOCKS = [1, 100, 5000, 1 << 16]


def _ids(c):
    return "x".join(map(str, c))


def make(shape, dtype=torch.float64, seed=0):
    B, H, Hkv, Nq, Nk, D, Dv = shape
    g = torch.Generator().manual_seed(seed)

    def r(h, n, d):
        return torch.randn(B, h, n, d, generator=g, dtype=torch.float64).to(dtype)
    return dict(q=r(H, Nq, D), k=r(Hkv, Nk, D), v=r(Hkv, Nk, Dv), q_dot=r(H, Nq, D),
                k_dot=r(Hkv, Nk, D), v_dot=r(Hkv, Nk, Dv), G_O=r(H, Nq, Dv), C_O=r(H, Nq, Dv))


def make_mask(kind, shape, seed=1):
    B, H, Hkv, Nq, Nk = shape[:5]
    g = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "bool_head":  # per query head, row 0 of every head fully masked
        m = torch.rand(1, H, Nq, Nk, generator=g) > 0.4
        m[:, :, 1:, 0] = True
        m[:, :, 0, :] = False
        return m
    if kind == "bool_batch":  # per batch element (a key-padding-style mask)
        m = torch.rand(B, 1, 1, Nk, generator=g) > 0.3
        m[..., 0] = True
        return m
    return torch.randn(Nq, Nk, generator=g, dtype=torch.float64)


def up(x):
    return None if x is None else x.double()


def run(shape, mask_kind, causal, exact, block, emulate, dtype=torch.float64, drop=()):
    t = make(shape, dtype)
    for n in drop:
        t[n] = None
    mask = make_mask(mask_kind, shape)
    fwd_args = (t["q"], t["k"], t["v"], t["q_dot"], t["k_dot"], t["v_dot"], mask, causal, None)
    what = f"{shape} mask={mask_kind} causal={causal} exact={exact} block={block} " \
           f"emulate={emulate} drop={drop}"
    f = torch.ops.oba_ext._attention_forward_config(*fwd_args, block, emulate)
    f64 = ref.attention_two_stream_forward(*[up(x) for x in fwd_args[:6]], mask, causal, None)
    ft = ref.attention_two_stream_forward(*fwd_args)
    for name, a, b, c in zip(FWD, f, f64, ft):
        if name == "lse":  # −inf on fully masked rows, equal positions
            assert torch.equal(torch.isneginf(a), torch.isneginf(b)), what
            live = ~torch.isneginf(b)
            a, b, c = a[live], b[live], c[live]
        assert_matches(a, b, c, dtype=dtype, what=f"{what} {name}")
    bwd_rest = (t["G_O"], t["C_O"], mask, causal, None)
    b = torch.ops.oba_ext._attention_backward_config(*fwd_args[:6], *bwd_rest, f[2], exact,
                                                     block, emulate)
    b64 = ref.attention_second_order_backward(*[up(x) for x in fwd_args[:6]], up(t["G_O"]),
                                              up(t["C_O"]), mask, causal, None, None, exact)
    bt = ref.attention_second_order_backward(*fwd_args[:6], *bwd_rest, None, exact)
    for name, a, r64, tw in zip(BWD, b, b64, bt):
        assert a.shape == r64.shape, (what, name)
        assert_matches(a, r64, tw, dtype=dtype, what=f"{what} {name}")


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("mask_kind,causal", [(None, False), ("bool_head", False),
                                              ("bool_batch", True), ("add", True)],
                         ids=["nomask", "bool_head", "bool_batch+causal", "add+causal"])
def test_warp_decomposition_matches_twin(shape, mask_kind, causal, kernels):
    """The CUDA row kernel's 32-lane arithmetic, on blocks of every geometry."""
    kernels("cpu")
    for block in BLOCKS:
        run(shape, mask_kind, causal, exact=True, block=block, emulate=True)
    run(shape, mask_kind, causal, exact=False, block=100, emulate=True)


@pytest.mark.parametrize("shape", SHAPES[2:], ids=_ids)
def test_float32_blocks(shape, kernels):
    """float32: at most twice the float32 twin's error against float64 (tolerances.py)."""
    kernels("cpu")
    for emulate in (False, True):
        run(shape, "bool_head", True, True, 100, emulate, dtype=torch.float32)


@pytest.mark.parametrize("drop", [("q_dot", "k_dot", "v_dot", "C_O"), ("v_dot", "C_O"),
                                  ("q_dot",), ("k_dot", "C_O"), ("C_O",)],
                         ids=lambda d: "-".join(d))
@pytest.mark.parametrize("exact", [False, True])
def test_absent_streams(drop, exact, kernels):
    """Every combination of zero tangents / zero C_O skips its GEMMs and still writes every
    output (outputs are allocated uninitialised)."""
    kernels("cpu")
    for emulate in (False, True):
        run((2, 4, 2, 9, 11, 16, 16), "add", False, exact, 100, emulate, drop=drop)


def test_public_ops_grouped_query(kernels):
    """The public ops take k/v with fewer heads and never repeat them."""
    kernels("cpu")
    t = make((2, 6, 3, 19, 23, 16, 8))
    args = [t[n] for n in ("q", "k", "v", "q_dot", "k_dot", "v_dot")]
    f = ops.attention_two_stream_forward(*args, None, True, None)
    r = ref.attention_two_stream_forward(*args, None, True, None)
    for name, a, b in zip(FWD, f, r):
        assert_matches(a, b, what=name)
    bk = ops.attention_second_order_backward(*args, t["G_O"], t["C_O"], None, True, None, f[2],
                                             True)
    br = ref.attention_second_order_backward(*args, t["G_O"], t["C_O"], None, True, None, None,
                                             True)
    for name, a, b in zip(BWD, bk, br):
        assert a.shape == b.shape, name
        assert_matches(a, b, what=name)
    assert bk[1].shape == t["k"].shape and bk[5].shape == t["v"].shape


def test_grouped_query_heads_are_checked(kernels):
    kernels("cpu")
    t = make((1, 4, 3, 5, 5, 8, 8))
    with pytest.raises(RuntimeError, match="heads dividing"):
        ops.attention_two_stream_forward(t["q"], t["k"], t["v"], None, None, None)


def test_long_sequence_small_blocks(kernels):
    """N = 1024 with blocks of 3000 scores (2 rows of one head per block)."""
    kernels("cpu")
    run((1, 2, 2, 1024, 1024, 16, 16), None, True, True, 3000, False)


def test_emulated_warp_differs_only_by_rounding(kernels):
    """32-lane sums and 1-lane sums are different roundings of the same numbers."""
    kernels("cpu")
    t = make((2, 2, 2, 70, 70, 16, 16), torch.float32)
    args = [t[n] for n in ("q", "k", "v", "q_dot", "k_dot", "v_dot")]
    a = torch.ops.oba_ext._attention_forward_config(*args, None, False, None, 1 << 16, False)
    b = torch.ops.oba_ext._attention_forward_config(*args, None, False, None, 1 << 16, True)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=WARP_VS_SERIAL_RTOL, atol=WARP_VS_SERIAL_ATOL)


def test_config_ops_check_block(kernels):
    kernels("cpu")
    t = make((1, 1, 1, 3, 3, 4, 4))
    with pytest.raises(RuntimeError, match="block_elems must be >= 1"):
        torch.ops.oba_ext._attention_forward_config(t["q"], t["k"], t["v"], None, None, None,
                                                    None, False, None, 0, False)


def test_opcheck_config_ops(kernels):
    kernels("cpu")
    t = make((1, 4, 2, 5, 7, 8, 8))
    args = [t[n] for n in ("q", "k", "v", "q_dot", "k_dot", "v_dot")]
    fwd = torch.ops.oba_ext._attention_forward_config
    bwd = torch.ops.oba_ext._attention_backward_config
    torch.library.opcheck(fwd, (*args, None, True, None, 40, True))
    lse = fwd(*args, None, True, None, 40, True)[2]
    torch.library.opcheck(bwd, (*args, t["G_O"], t["C_O"], None, True, None, lse, True, 40, True))
    torch.library.opcheck(torch.ops.oba_ext.attention_two_stream_forward,
                          (*args, None, False, None))
