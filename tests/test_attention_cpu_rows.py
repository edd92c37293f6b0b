"""The CPU ops' own row pass (csrc/cpu/attention.cpp ``AtenRows``: softmax, its tangent and the
product-rule terms as whole-block ATen ops) against the float64 twins, on every block geometry
of tests/test_attention_blocks.py.

test_attention_blocks.py runs the CUDA kernel's row functions (``emulate_warp=True``) over
these geometries; here the same sizes, masks and block budgets run the row pass the public CPU
ops use (``emulate_warp=False``): masks read per batch element when a block's groups straddle
two of them, causal bounds inside row blocks that split a head, dead (fully masked) rows.
"""
import pytest

from test_attention_blocks import BLOCKS, SHAPES, _ids, run


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_cpu_row_pass_matches_twin(shape, kernels):
    """No mask, per-head bool, per-batch bool + causal, additive + causal; every block budget."""
    kernels("cpu")
    for mask_kind, causal in ((None, False), ("bool_head", False), ("bool_batch", True),
                              ("add", True)):
        for block in BLOCKS:
            run(shape, mask_kind, causal, exact=True, block=block, emulate=False)
        run(shape, mask_kind, causal, exact=False, block=100, emulate=False)


@pytest.mark.parametrize("block", [1, 3000, 1 << 16], ids=lambda b: f"block{b}")
def test_cpu_row_pass_long_causal(block, kernels):
    """N = 300 causal: the last row blocks of a head hide fewer keys than their first row."""
    kernels("cpu")
    run((1, 2, 2, 300, 300, 16, 16), "bool_batch", True, True, block, False)
