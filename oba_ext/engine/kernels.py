"""The one place that chooses between our compiled kernels and their pure-PyTorch twins.

The engine calls the score reductions of SPEC §5 (and the attention sweep of SPEC §4) through
the six names below. Each resolves, per device type, to the compiled op in :mod:`oba_ext.ops`
when ``oba_ext._ext.kernels_available(device)`` says kernels exist for that device, else to the
same-named twin in :mod:`oba_ext.reference` (``channel`` / ``weight`` / ``attention``).

- ``channel_score_reduce(a, b, c, d, channel_dim) -> (second, first)``:
  ``second[k] = Σ_{dims≠k} a⊙(b−d) + c⊙d``, ``first[k] = Σ a⊙d`` (``b=None``: zero tangent,
  ``c=None``: zero second cotangent).
- ``channel_first_order_reduce(a, d, channel_dim) -> first``: ``first[k] = Σ a⊙d`` alone.
- ``linear_weight_score(w, grads, inputs) = w ⊙ Σ_k grads[k]ᵀ inputs[k]`` (leading dims flattened).
- ``conv_weight_score(w, grads, inputs, stride, padding, dilation, groups)
  = w ⊙ Σ_k wgrad(inputs[k], grads[k])``.
- ``attention_two_stream_forward`` / ``attention_second_order_backward`` (SPEC §4).
"""
from __future__ import annotations

import functools
from typing import List, Optional

import torch
from torch import Tensor

from .. import _ext
from ..ops import attention as _ops_attention
from ..ops import channel as _ops_channel
from ..ops import weight as _ops_weight
from ..reference import attention as _ref_attention
from ..reference import channel as _ref_channel
from ..reference import weight as _ref_weight

_NAMES = ("channel_score_reduce", "channel_first_order_reduce", "linear_weight_score",
          "conv_weight_score", "attention_two_stream_forward", "attention_second_order_backward")
_KERNELS = {"channel_score_reduce": _ops_channel, "channel_first_order_reduce": _ops_channel,
            "linear_weight_score": _ops_weight, "conv_weight_score": _ops_weight,
            "attention_two_stream_forward": _ops_attention,
            "attention_second_order_backward": _ops_attention}
_TWINS = {"channel_score_reduce": _ref_channel, "channel_first_order_reduce": _ref_channel,
          "linear_weight_score": _ref_weight, "conv_weight_score": _ref_weight,
          "attention_two_stream_forward": _ref_attention,
          "attention_second_order_backward": _ref_attention}


@functools.lru_cache(maxsize=None)
def resolve(name: str, device_type: str):
    """The implementation of op ``name`` for tensors on ``device_type`` ("cpu", "cuda", ...)."""
    if name not in _NAMES:
        raise KeyError(f"engine.kernels: unknown op {name!r}; expected one of {list(_NAMES)}")
    try:
        use_kernel = bool(_ext.kernels_available(device_type))
    except Exception:  # an unknown device type means "no kernels", never a crash
        use_kernel = False
    return getattr((_KERNELS if use_kernel else _TWINS)[name], name)


def which(device_type: str) -> dict:
    """{op name: "module.function"} actually used on ``device_type`` (for info and tests)."""
    return {n: f"{resolve(n, device_type).__module__}.{n}" for n in _NAMES}


def channel_score_reduce(a: Tensor, b: Optional[Tensor], c: Optional[Tensor], d: Tensor,
                         channel_dim: int):
    return resolve("channel_score_reduce", a.device.type)(a, b, c, d, channel_dim)


def channel_first_order_reduce(a: Tensor, d: Tensor, channel_dim: int) -> Tensor:
    return resolve("channel_first_order_reduce", a.device.type)(a, d, channel_dim)


def linear_weight_score(w: Tensor, grads: List[Tensor], inputs: List[Tensor]) -> Tensor:
    return resolve("linear_weight_score", w.device.type)(w, grads, inputs)


def conv_weight_score(w: Tensor, grads: List[Tensor], inputs: List[Tensor], stride, padding,
                      dilation, groups: int) -> Tensor:
    return resolve("conv_weight_score", w.device.type)(w, grads, inputs, stride, padding,
                                                       dilation, groups)


# attention (SPEC §4); the CPU kernels take float32/float64 only, other dtypes use the twin
_CPU_ATTENTION_DTYPES = (torch.float32, torch.float64)


def _attention_impl(name: str, q: Tensor):
    if q.device.type == "cpu" and q.dtype not in _CPU_ATTENTION_DTYPES:
        return getattr(_TWINS[name], name)
    return resolve(name, q.device.type)


def attention_two_stream_forward(q, k, v, q_dot, k_dot, v_dot, mask, is_causal, scale):
    return _attention_impl("attention_two_stream_forward", q)(q, k, v, q_dot, k_dot, v_dot, mask,
                                                              is_causal, scale)


def attention_second_order_backward(q, k, v, q_dot, k_dot, v_dot, G_O, C_O, mask, is_causal,
                                    scale, lse, exact):
    return _attention_impl("attention_second_order_backward", q)(
        q, k, v, q_dot, k_dot, v_dot, G_O, C_O, mask, is_causal, scale, lse, exact)
