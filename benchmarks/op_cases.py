"""Providers for the Linear/Conv score ops, shared by ``bench_linear.py`` and ``bench_conv.py``.

Every builder returns ``{provider: setup}`` for :func:`benchmarks.harness.run_sweep`, where
``setup(shape) -> Case``. Providers:

- ``kernel``: ``oba_ext.ops.<op>`` (``torch.ops.oba_ext.*``; fails setup when not built),
- ``reference``: the pure-PyTorch twin ``oba_ext.reference.{channel,weight}.<op>``,
- ``torch_func`` (weight scores only): what autograd alone would do, the weight gradient of the
  layer via ``torch.func.vjp`` at the stacked streams, then ``⊙ w``.

Work per call (for GB/s and TFLOP/s), element size s, n elements per tensor:
- ``channel_score_reduce``: reads a, b, c, d (4·n·s bytes; the (C,) outputs are negligible);
  the reduction's GB/s is the figure of merit (it is memory-bound).
- ``linear_weight_score`` with k streams of (M, C_in)/(M, C_out): 2·k·M·C_in·C_out FLOPs.
- ``conv_weight_score``: 2·k·N·C_out·(C_in/groups)·K·H_out·W_out FLOPs.
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch
import torch.nn.functional as F

from .harness import Case


def _rand(shape, dtype, device, gen_seed, channels_last=False):
    g = torch.Generator(device=device).manual_seed(gen_seed)
    t = torch.randn(shape, dtype=dtype, device=device, generator=g)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def _impls(op: str):
    """name -> the op's implementation, resolved lazily so a missing build fails only 'kernel'."""
    def kernel():
        from oba_ext import _ext, ops
        if not _ext.load():
            raise RuntimeError(f"oba_ext._C is not loaded ({_ext.load_error})")
        return getattr(ops, op)

    def reference():
        from oba_ext.reference import channel, weight
        return getattr(channel, op, None) or getattr(weight, op)
    return {"kernel": kernel, "reference": reference}


def channel_reduce_providers(channel_dim: int, dtype, device, channels_last: bool = False,
                             with_tangent: bool = True) -> Dict[str, Callable]:
    """``channel_score_reduce(a, b, c, d, channel_dim)`` on four tensors of the swept shape."""
    def make(impl_name, resolve):
        def setup(shape):
            fn = resolve()
            a, c, d = (_rand(shape, dtype, device, s, channels_last) for s in (1, 2, 3))
            b = _rand(shape, dtype, device, 4, channels_last) if with_tangent else None
            n_tensors = 4 if with_tangent else 3
            return Case(lambda: fn(a, b, c, d, channel_dim),
                        bytes=float(n_tensors * a.numel() * a.element_size()),
                        flops=None, info={"impl": impl_name, "channel_dim": channel_dim,
                                          "channels_last": channels_last, "b_none": not with_tangent})
        return setup
    return {name: make(name, r) for name, r in _impls("channel_score_reduce").items()}


def linear_weight_providers(streams: int, dtype, device) -> Dict[str, Callable]:
    """``linear_weight_score(w, grads, inputs)``; shape = (M, C_in, C_out), ``streams`` pairs."""
    def tensors(shape):
        m, cin, cout = shape
        w = _rand((cout, cin), dtype, device, 0)
        grads = [_rand((m, cout), dtype, device, 10 + k) for k in range(streams)]
        inputs = [_rand((m, cin), dtype, device, 20 + k) for k in range(streams)]
        return w, grads, inputs, 2.0 * streams * m * cin * cout

    def make(name, resolve):
        def setup(shape):
            fn = resolve()
            w, grads, inputs, flops = tensors(shape)
            return Case(lambda: fn(w, grads, inputs), flops=flops, info={"impl": name, "streams": streams})
        return setup

    def torch_func(shape):
        w, grads, inputs, flops = tensors(shape)
        x, g = torch.cat(inputs), torch.cat(grads)

        def call():
            _, vjp = torch.func.vjp(lambda w_: F.linear(x, w_), w)
            return w * vjp(g)[0]
        return Case(call, flops=flops, info={"impl": "torch.func.vjp", "streams": streams})

    provs = {name: make(name, r) for name, r in _impls("linear_weight_score").items()}
    provs["torch_func"] = torch_func
    return provs


def conv_weight_providers(streams: int, dtype, device, kernel_size: int, stride: int, padding: int,
                          groups: int, channels_last: bool = False) -> Dict[str, Callable]:
    """``conv_weight_score`` for Conv2d; shape = (N, C_in, H, W, C_out)."""
    def tensors(shape):
        n, cin, h, wd, cout = shape
        if cin % groups or cout % groups:
            raise ValueError(f"shape {shape}: C_in and C_out must be divisible by groups={groups}")
        w = _rand((cout, cin // groups, kernel_size, kernel_size), dtype, device, 0)
        inputs = [_rand((n, cin, h, wd), dtype, device, 20 + k, channels_last) for k in range(streams)]
        ho = (h + 2 * padding - kernel_size) // stride + 1
        wo = (wd + 2 * padding - kernel_size) // stride + 1
        grads = [_rand((n, cout, ho, wo), dtype, device, 10 + k, channels_last) for k in range(streams)]
        flops = 2.0 * streams * n * cout * (cin // groups) * kernel_size ** 2 * ho * wo
        return w, grads, inputs, flops

    args = ([stride] * 2, [padding] * 2, [1, 1], groups)
    info = {"streams": streams, "k": kernel_size, "stride": stride, "padding": padding,
            "groups": groups, "channels_last": channels_last}

    def make(name, resolve):
        def setup(shape):
            fn = resolve()
            w, grads, inputs, flops = tensors(shape)
            return Case(lambda: fn(w, grads, inputs, *args), flops=flops, info={"impl": name, **info})
        return setup

    def torch_func(shape):
        w, grads, inputs, flops = tensors(shape)
        x, g = torch.cat(inputs), torch.cat(grads)

        def call():
            _, vjp = torch.func.vjp(lambda w_: F.conv2d(x, w_, None, stride, padding, 1, groups), w)
            return w * vjp(g)[0]
        return Case(call, flops=flops, info={"impl": "torch.func.vjp", **info})

    provs = {name: make(name, r) for name, r in _impls("conv_weight_score").items()}
    provs["torch_func"] = torch_func
    return provs


def copy_bandwidth_case(device, nbytes: int = 1 << 30) -> Case:
    """A large device-to-device copy (``dst.copy_(src)``): reads + writes 2·nbytes."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    return Case(lambda: dst.copy_(src), bytes=2.0 * src.numel() * 4, info={"impl": "copy_"})


def fraction_of_copy(rows: Sequence[dict], copy_gbps: float, env_note: str = "") -> list:
    """Extra rows: each 'bandwidth' row of the channel reduction as a fraction of the copy's."""
    out = []
    for r in rows:
        if r["metric"] == "bandwidth":
            f = {**r, "metric": "fraction_of_copy_bw", "unit": "fraction"}
            for q in ("p20", "p50", "p80"):
                f[q] = f"{float(r[q]) / copy_gbps:.4f}"
            out.append(f)
    return out
