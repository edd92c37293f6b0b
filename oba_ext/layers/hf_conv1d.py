"""Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT, GPT-2): ``Y = X W + b`` with
weight (C_in, C_out) — a Linear with a transposed weight — and bias (C_out,).

out o: column o of W plus bias o (C_out,); in j: row j of W (C_in,). Engine rule:
:class:`oba_ext.engine.rules.linear.HFConv1DRule`. Registered lazily (``lazy_types``): the
kind applies once the user has imported transformers; oba_ext never imports it. Torch-Pruning
1.6 has no pruner for this class, so ``tp_handlers`` is empty (GPT-2 scores are for ranking,
unstructured masks and head scores).
"""
from __future__ import annotations

from .base import LayerKind, reduce_rows_cols, zero_shape_dense


def _reduce(m, s, keys):
    w, b = s["weight"], s.get("bias")
    return reduce_rows_cols(keys, w, b, lambda: w.sum(0) if b is None else w.sum(0) + b,
                            lambda: w.sum(1))


HF_CONV1D = LayerKind(
    name="hf_conv1d", module_types=(), lazy_types=(("transformers.pytorch_utils", "Conv1D"),),
    params=("weight", "bias"), keys=("out", "in", "weight", "bias"),
    shape=zero_shape_dense(lambda m: int(m.weight.shape[1]), lambda m: int(m.weight.shape[0])),
    reduce=_reduce, tp_handlers={}, channels=lambda m: int(m.weight.shape[1]))

KINDS = (HF_CONV1D,)
