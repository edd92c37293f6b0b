"""nn.Conv1d / nn.Conv2d (any stride, padding, dilation, groups incl. depthwise; with or without
bias), target or not. X: (N, C_in, *spatial) with batch; channels on dim 1.

Input gradient and weight gradient use ``aten.convolution_backward`` (the op autograd itself
calls), so the stacked streams cost one input-gradient convolution over 2N.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from . import register_module
from .pairs import stack_pair
from .target import TwoStreamLayerRule


def conv_padding(module) -> list:
    """Numeric padding of ``module`` (resolving "same"/"valid"); ValueError if asymmetric."""
    p = module.padding
    k, d = module.kernel_size, module.dilation
    if p == "valid":
        return [0] * len(k)
    if p == "same":
        out = []
        for ki, di in zip(k, d):
            total = di * (ki - 1)
            if total % 2:
                raise ValueError(f"padding='same' with kernel {k} and dilation {d} is asymmetric")
            out.append(total // 2)
        return out
    return list(p)


class ConvRule(TwoStreamLayerRule):
    def _params(self, m):
        return list(m.stride), conv_padding(m), list(m.dilation), m.groups

    def apply(self, module, x, w):
        stride, padding, dilation, groups = self._params(module)
        return torch.ops.aten.convolution(x, w, None, stride, padding, dilation, False,
                                          [0] * (w.dim() - 2), groups)

    def _backward(self, module, g, x, w, output_mask):
        """``aten.convolution_backward`` of this (bias-free, not transposed) convolution:
        ``(Wᵀ⊛g, gᵀ⊛x, None)``, each computed only where ``output_mask`` (3 bools) asks."""
        stride, padding, dilation, groups = self._params(module)
        return torch.ops.aten.convolution_backward(
            g, x, w, None, stride, padding, dilation, False, [0] * (w.dim() - 2), groups,
            output_mask)

    def input_grad(self, module, g, w, x_shape):
        x_like = g.new_empty(()).expand(x_shape)
        gx, _, _ = self._backward(module, g, x_like, w, [True, False, False])
        return gx

    def weight_score(self, module, w, grads, inputs):
        stride, padding, dilation, groups = self._params(module)
        return kernels.conv_weight_score(w, grads, inputs, stride, padding, dilation, groups)

    def weight_product(self, module, w, grads, inputs):
        # one weight-gradient convolution over the batch-stacked streams (aten's own wgrad)
        g = grads[0] if len(grads) == 1 else torch.cat(grads, 0)
        x = inputs[0] if len(inputs) == 1 else stack_pair(*inputs) if len(inputs) == 2 else \
            torch.cat(inputs, 0)
        _, gw, _ = self._backward(module, g, x, w, [False, True, False])
        return gw

    def input_and_weight_grad(self, module, g, x, w):
        gx, gw, _ = self._backward(module, g, x, w, [True, True, False])
        return gx, gw

    def channel_dims(self, y):
        return 1, 1

    def bias_view(self, b, y):
        return b.view((-1,) + (1,) * (y.dim() - 2))

    def forward(self, call, ctx):
        x = call.inputs[0]
        nd = call.module.weight.dim() - 2
        if x.dim() != nd + 2:
            raise ValueError(f"{ctx.name}: the engine needs batched input (N, C, *spatial) of "
                             f"dim {nd + 2} for {type(call.module).__name__}, got shape "
                             f"{tuple(x.shape)}")
        return super().forward(call, ctx)


register_module(nn.Conv1d, nn.Conv2d)(ConvRule())


class ConvTransposeRule(ConvRule):
    """nn.ConvTranspose1d / nn.ConvTranspose2d (any stride, padding, output_padding, dilation,
    groups; with or without bias), target or not: the same two-stream forward/backward and
    SPEC §5 scores as :class:`ConvRule` (channels on dim 1, batched input checked the same
    way), with the transposed convolution as the op (its input gradient is a convolution, done
    by ``aten.convolution_backward(transposed=True)``). The per-weight scores use that op's
    weight gradient over the stacked streams ``[G; C]``, ``[T; X]`` (there is no compiled
    kernel for the transposed weight gradient). A call with ``output_size`` is refused at
    capture (``impl="auto"`` then falls back to the reference path)."""

    def _params(self, m):
        return list(m.stride), list(m.padding), list(m.dilation), list(m.output_padding), m.groups

    def apply(self, module, x, w):
        stride, padding, dilation, out_pad, groups = self._params(module)
        return torch.ops.aten.convolution(x, w, None, stride, padding, dilation, True, out_pad,
                                          groups)

    def _backward(self, module, g, x, w, output_mask):
        """``aten.convolution_backward(transposed=True)``; what :meth:`ConvRule.input_grad` and
        :meth:`ConvRule.input_and_weight_grad` call."""
        stride, padding, dilation, out_pad, groups = self._params(module)
        return torch.ops.aten.convolution_backward(g, x, w, None, stride, padding, dilation, True,
                                                   out_pad, groups, output_mask)

    def weight_product(self, module, w, grads, inputs):
        g = grads[0] if len(grads) == 1 else torch.cat(grads)
        x = inputs[0] if len(inputs) == 1 else torch.cat(inputs)
        return self._backward(module, g, x, w, [False, True, False])[1]

    def weight_score(self, module, w, grads, inputs):
        return w * self.weight_product(module, w, grads, inputs)

    def capture_check(self, node, module):
        if len(node.args) > 1 or "output_size" in node.kwargs:
            return (f"{node.target}: {type(module).__name__} called with output_size is not "
                    f"supported by the engine (set output_padding on the module instead)")
        return None


register_module(nn.ConvTranspose1d, nn.ConvTranspose2d)(ConvTransposeRule())
