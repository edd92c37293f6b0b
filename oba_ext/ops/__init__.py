"""Typed wrappers over the compiled kernels ``torch.ops.oba_ext.*`` (with ``register_fake``).

Each raises a RuntimeError when the extension is not loaded; choosing between a kernel and its
pure-PyTorch twin (``oba_ext.reference.<kind>``, same name and signature) is the caller's job
(the engine's registry), never done silently here. ``oba_ext._ext.kernels_available(device)``
says whether the kernels can run on a device.
"""
from .channel import channel_first_order_reduce, channel_score_reduce, channel_score_reduce_add_
from .weight import conv_weight_score, linear_weight_score

__all__ = ["channel_score_reduce", "channel_score_reduce_add_", "channel_first_order_reduce",
           "linear_weight_score",
           "conv_weight_score"]
