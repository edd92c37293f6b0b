"""Every registered engine rule, tested as a rule (issue 12, ask 4).

For each entry of ``oba_ext.engine.rules`` MODULE_RULES / FUNCTION_RULES / METHOD_RULES, the
rule runs on one fx node of a tiny wrapper (random float64 inputs, random tangents T, random
cotangents G and C) next to the generic torch.func rule (``rules.generic.GenericRule``), and
every output is compared per tensor to FLOAT64_RTOL:

- forward: y and the tangent T_y;
- backward, first order (mode None): G per input, and no C;
- backward, ``exact``: G and C — C = vjp(C) + the op's own second-order term;
- backward, ``oba``: G and C against the *right* expectation: for a linear or elementwise op
  the linearized stream vjp(C) (what the generic rule computes); for a product of two
  θ-dependent values (mul, matmul, bmm, einsum, addcmul, addmm, bilinear, F.linear/conv with a
  weight input) vjp(C) plus the product-rule cross terms (= the generic ``exact`` stream, the
  op being bilinear); for products behind nonlinearities (attention, GLU, LSTM/GRU gates) the
  generic ``exact`` term of the op written out with its softmax/sigmoid/tanh replaced by their
  first-order expansion at the case's values (``Linearized``): exactly the cross terms;
- discrete ops (comparisons, argmax, integer casts, *_like): the op's own value, no tangent,
  no cotangent.

A registry entry without a case here FAILS (``test_every_rule_has_a_case``), with a message
saying what to add. To add a case: one line in CASES below, keyed by the entry's name as the
failure message prints it, e.g. ``"F.glu": fn(lambda x: F.glu(x, -1), (2, 3, 4), oba=LINEAR)``.
"""
from __future__ import annotations

import builtins
import math
import operator
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils import _pytree as pytree

from oba_ext.engine import rules as R
from oba_ext.engine.capture import _Tracer
from oba_ext.engine.rules.generic import GenericRule
from oba_ext.engine.sweep import _Ctx
from tolerances import assert_f64

R._load()

LINEAR, BILINEAR = "linear", "bilinear"   # oba expectation kinds (see the module docstring)


# ------------------------------------------------------------------ registry entry names
def _namespaces():
    import torchvision.ops
    return [("torch", torch), ("F", F), ("operator", operator), ("torch.Tensor", torch.Tensor),
            ("torchvision.ops", torchvision.ops), ("builtins", builtins)]


def entry_name(registry: str, key) -> str:
    """A stable, readable name for a registry key: "nn.Linear", "F.relu", "torch.add",
    "operator.iadd", "Tensor.view"."""
    if registry == "module":
        return f"nn.{key.__name__}" if key.__module__.startswith("torch.nn") else \
            f"{key.__module__}.{key.__name__}"
    if registry == "method":
        return f"Tensor.{key}"
    for prefix, ns in _namespaces():
        for attr in sorted(dir(ns), key=lambda a: a.startswith("_")):  # public names first
            try:
                if getattr(ns, attr) is key:
                    return f"{prefix}.{attr}"
            except Exception:  # some attributes raise on access
                continue
    return f"{getattr(key, '__module__', '?')}.{getattr(key, '__qualname__', repr(key))}"


try:  # rules for classes of optional packages join the registry once the package is imported
    import transformers.pytorch_utils as _hf_utils
except ImportError:  # pragma: no cover - transformers is a test dependency
    _hf_utils = None


def registry_entries():
    R._resolve_lazy_rules()
    out = [("module", k, v) for k, v in R.MODULE_RULES.items()]
    out += [("function", k, v) for k, v in R.FUNCTION_RULES.items()]
    out += [("method", k, v) for k, v in R.METHOD_RULES.items()]
    return {entry_name(reg, k): (reg, k, rule) for reg, k, rule in out}


# ------------------------------------------------------------------ cases
@dataclass
class Case:
    """``f(*inputs)`` contains the registry entry under test as one fx node.

    ``shapes``: the float64 inputs (drawn N(0,1); a callable instead of a shape builds one);
    ``oba``: LINEAR, BILINEAR, or a function ``(call_inputs) -> f_lin`` whose generic second
    -order term gives oba's (attention); ``module``: an nn.Module passed as ``f``'s first
    argument; ``metadata``: the op returns Python values (shape, dim): forward only."""
    f: Callable
    shapes: Sequence
    oba: Union[str, Callable] = LINEAR
    module: Optional[Callable[[], nn.Module]] = None
    metadata: bool = False
    positive: Sequence[int] = field(default_factory=tuple)   # inputs drawn > 0.5 (variances)
    generic_fn: Optional[Callable] = None   # what the generic rule differentiates, when the op
                                            # itself cannot be (fused kernels without forward
                                            # AD) or rounds a constant (hardsigmoid's 1/6)
    direct: Optional[Callable] = None       # (placeholder proxies) -> (args, kwargs) of a node
                                            # built by hand: for ops fx traces *through*
                                            # (F.sigmoid) or records otherwise (a == b)
    arbitrary_values: bool = False          # discrete op whose values are unspecified (empty)
    int_inputs: int = 0                     # > 0: inputs are indices in [0, int_inputs)


def fn(f, *shapes, oba=LINEAR, positive=(), generic_fn=None):
    return Case(f, shapes, oba, positive=positive, generic_fn=generic_fn)


def direct(*shapes, args=lambda *p: (p, {}), oba=LINEAR):
    """A function fx does not keep as a node when tracing (it traces through it): the node is
    built by hand with ``args(*placeholders)``."""
    return Case(None, shapes, oba, direct=args)


def mod(make, *shapes, call=None, oba=LINEAR, generic_fn=None):
    return Case(call or (lambda m, x: m(x)), shapes, oba, module=make, generic_fn=generic_fn)


def _hardsigmoid(x):  # exact 1/6 (PyTorch's own backward rounds it to float32)
    return torch.clamp(x / 6 + 0.5, 0, 1)


def _embedding_pad_constant(input, weight, padding_idx=None, *args, **kwargs):
    """``F.embedding`` with the padding row's lookup made constant by hand."""
    keep = (torch.arange(weight.shape[0]) == padding_idx).unsqueeze(-1)
    return F.embedding(input, torch.where(keep, weight.detach(), weight))


def _hardswish(x):
    return x * _hardsigmoid(x)


def _sdpa_math(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1) @ v


def meta(f, *shapes, direct_args=None, arbitrary=False):
    """Python-valued or discrete ops (shape, comparisons, argmax, casts to int): forward value
    only, no tangent, and no cotangent back."""
    return Case(f, shapes, metadata=True, direct=direct_args, arbitrary_values=arbitrary)


def _discrete_cases():
    """The discrete (no-stream) ops: comparisons, logical/bitwise ops, arg-reductions, integer
    casts, *_like / new_* constructors."""
    c = {}
    binary = ("eq", "ne", "lt", "le", "gt", "ge", "greater", "greater_equal", "less",
              "less_equal", "not_equal", "isclose", "equal")
    unary = ("isnan", "isinf", "isposinf", "isneginf", "isfinite", "isreal", "signbit", "argmax",
             "argmin", "argsort", "count_nonzero", "nonzero", "argwhere", "any", "all")
    logical = ("logical_and", "logical_or", "logical_xor", "bitwise_and", "bitwise_or",
               "bitwise_xor")
    for op in binary:
        c[f"torch.{op}"] = meta(lambda a, b, op=op: getattr(torch, op)(a, b), X, X)
        c[f"Tensor.{op}"] = meta(lambda a, b, op=op: getattr(a, op)(b), X, X)
    for op in unary:
        c[f"torch.{op}"] = meta(lambda a, op=op: getattr(torch, op)(a), X)
        c[f"Tensor.{op}"] = meta(lambda a, op=op: getattr(a, op)(), X)
    for op in logical:
        c[f"torch.{op}"] = meta(lambda a, b, op=op: getattr(torch, op)(a > 0, b > 0), X, X)
        c[f"Tensor.{op}"] = meta(lambda a, b, op=op: getattr(a > 0, op)(b > 0), X, X)
    c["torch.logical_not"] = meta(lambda a: torch.logical_not(a), X)
    c["Tensor.logical_not"] = meta(lambda a: a.logical_not(), X)
    c["torch.bitwise_not"] = meta(lambda a: torch.bitwise_not(a > 0), X)
    c["Tensor.bitwise_not"] = meta(lambda a: (a > 0).bitwise_not(), X)
    c["torch.bucketize"] = meta(lambda a: torch.bucketize(a, CONST[5]), X)
    c["torch.searchsorted"] = meta(lambda a: torch.searchsorted(CONST[5], a), X)
    for op in ("zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like",
               "randint_like"):
        extra = {"full_like": (2.5,), "randint_like": (3,)}.get(op, ())
        c[f"torch.{op}"] = meta(lambda a, op=op, e=extra: getattr(torch, op)(a, *e), X,
                                arbitrary=op in ("empty_like", "rand_like", "randn_like",
                                                 "randint_like"))
    for op, extra in (("new_zeros", ((2, 3),)), ("new_ones", ((2,),)), ("new_empty", ((3,),)),
                      ("new_full", ((2,), 1.5)), ("new_tensor", ([1.0, 2.0],))):
        c[f"Tensor.{op}"] = meta(lambda a, op=op, e=extra: getattr(a, op)(*e), X,
                                 arbitrary=op == "new_empty")
    for op in ("long", "int", "bool", "short", "byte", "char"):
        c[f"Tensor.{op}"] = meta(lambda a, op=op: getattr(a * 3, op)(), X)
    for op, sym in (("eq", "=="), ("ne", "!="), ("lt", "<"), ("le", "<="), ("gt", ">"),
                    ("ge", ">=")):
        c[f"operator.{op}"] = meta(lambda a, b, op=op: getattr(operator, op)(a, b), X, X)
        c[f"Tensor.__{op}__"] = meta(None, X, X, direct_args=lambda a, b, op=op: ((a, b), {}))
    for op in ("and_", "or_", "xor"):
        c[f"operator.{op}"] = meta(lambda a, b, op=op: getattr(operator, op)(a > 0, b > 0), X, X)
        dunder = "__" + op.rstrip("_") + "__"
        c[f"Tensor.{dunder}"] = meta(None, X, X, direct_args=lambda a, b: ((a > 0, b > 0), {}))
    c["operator.invert"] = meta(lambda a: ~(a > 0), X)
    c["Tensor.__invert__"] = meta(None, X, direct_args=lambda a: ((a > 0,), {}))
    c["operator.not_"] = meta(None, (1,), direct_args=lambda a: ((a > 0,), {}))
    return c


def _softmax_linearized(s, s0):
    """softmax(s0) + its Jacobian at s0 applied to (s − s0): first order exact, no curvature."""
    a0 = torch.softmax(s0, -1)
    d = s - s0
    return a0 + a0 * (d - (a0 * d).sum(-1, keepdim=True))


def sdpa_lin(inputs):
    q0, k0 = inputs[0].detach(), inputs[1].detach()
    s0 = q0 @ k0.transpose(-2, -1) / math.sqrt(q0.shape[-1])

    def f(q, k, v):
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        return _softmax_linearized(s, s0) @ v
    return f


MHA_E, MHA_H = 8, 2


def make_mha():
    return nn.MultiheadAttention(MHA_E, MHA_H, batch_first=True).double().eval()


def _mha_proj(m, xq, xk, xv):
    """q, k, v heads (B, H, L, E/H) of a batch_first, packed nn.MultiheadAttention."""
    w, b = m.in_proj_weight, m.in_proj_bias
    q, k, v = (F.linear(x, w[i * MHA_E:(i + 1) * MHA_E], b[i * MHA_E:(i + 1) * MHA_E])
               for i, x in enumerate((xq, xk, xv)))
    return tuple(t.reshape(t.shape[0], t.shape[1], MHA_H, -1).transpose(1, 2) for t in (q, k, v))


def mha_math(m):
    """The module's computation written out (no fused kernel), for the generic rule."""
    def f(xq, xk, xv):
        q, k, v = _mha_proj(m, xq, xk, xv)
        o = _sdpa_math(q, k, v).transpose(1, 2).reshape(xq.shape)
        return F.linear(o, m.out_proj.weight, m.out_proj.bias)
    return f


def mha_lin_factory(m):
    def factory(inputs):
        q0, k0, _ = (t.detach() for t in _mha_proj(m, *inputs[:3]))
        s0 = q0 @ k0.transpose(-2, -1) / math.sqrt(q0.shape[-1])

        def f(xq, xk, xv):
            q, k, v = _mha_proj(m, xq, xk, xv)
            s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            o = (_softmax_linearized(s, s0) @ v).transpose(1, 2).reshape(xq.shape)
            return F.linear(o, m.out_proj.weight, m.out_proj.bias)
        return f
    return factory


def _bn(cls, shape, train):
    def make():
        m = cls(shape[1]).double().train(train)
        with torch.no_grad():
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.3, 0.3)
        return m
    return make


def _bn_batch_stats(m):
    """A train-mode BatchNorm without the running-statistics update (which is a side effect the
    engine never performs and torch.func cannot differentiate through)."""
    return lambda x: F.batch_norm(x, None, None, m.weight, m.bias, True, 0.0, m.eps)


#: constant (non-θ) tensors for ops whose other operands must not carry a tangent
CONST = {n: torch.linspace(-0.5, 0.5, n, dtype=torch.float64) for n in (3, 4, 5)}


def _act(cls, *a):
    return mod(lambda: cls(*a), (2, 3, 5))


X = (2, 3, 4)
CASES = {
    # ---- modules
    "nn.Linear": mod(lambda: nn.Linear(4, 5).double(), X),
    "nn.MultiheadAttention": Case(lambda m, x: m(x, x, x, need_weights=False)[0], [(2, 5, MHA_E)],
                                  oba="mha", module=make_mha),
    "nn.Conv1d": mod(lambda: nn.Conv1d(3, 4, 3, padding=1).double(), (2, 3, 6)),
    "nn.Conv2d": mod(lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1).double(), (2, 3, 6, 6)),
    "nn.ReLU": _act(nn.ReLU),
    "nn.Hardtanh": _act(nn.Hardtanh, -0.5, 0.5),
    "nn.LeakyReLU": _act(nn.LeakyReLU, 0.1),
    "nn.GELU": _act(nn.GELU),
    "nn.SiLU": _act(nn.SiLU),
    "nn.Sigmoid": _act(nn.Sigmoid),
    "nn.Tanh": _act(nn.Tanh),
    "nn.Hardswish": mod(lambda: nn.Hardswish(), (2, 3, 5), generic_fn=lambda m: _hardswish),
    "nn.Hardsigmoid": mod(lambda: nn.Hardsigmoid(), (2, 3, 5), generic_fn=lambda m: _hardsigmoid),
    "nn.BatchNorm1d": mod(_bn(nn.BatchNorm1d, (4, 3), train=True), (4, 3), generic_fn=_bn_batch_stats),
    "nn.BatchNorm2d": mod(_bn(nn.BatchNorm2d, (2, 3), train=False), (2, 3, 4, 4)),
    "nn.BatchNorm3d": mod(_bn(nn.BatchNorm3d, (2, 3), train=True), (2, 3, 2, 3, 2),
                          generic_fn=_bn_batch_stats),
    "nn.LayerNorm": mod(lambda: nn.LayerNorm(4).double(), X),
    "nn.GroupNorm": mod(lambda: nn.GroupNorm(2, 4).double(), (2, 4, 3)),
    "nn.Flatten": mod(lambda: nn.Flatten(), X),
    "nn.Unflatten": mod(lambda: nn.Unflatten(2, (2, 2)), X),
    "nn.Identity": mod(lambda: nn.Identity(), X),
    "nn.Dropout": mod(lambda: nn.Dropout(0.3).eval(), X),
    "nn.Dropout1d": mod(lambda: nn.Dropout1d(0.3).eval(), X),
    "nn.Dropout2d": mod(lambda: nn.Dropout2d(0.3).eval(), (2, 3, 4, 4)),
    "nn.MaxPool1d": mod(lambda: nn.MaxPool1d(2), (2, 3, 6)),
    "nn.MaxPool2d": mod(lambda: nn.MaxPool2d(2, stride=1), (2, 3, 4, 4)),
    "nn.AvgPool1d": mod(lambda: nn.AvgPool1d(2), (2, 3, 6)),
    "nn.AvgPool2d": mod(lambda: nn.AvgPool2d(2), (2, 3, 4, 4)),
    "nn.AdaptiveAvgPool1d": mod(lambda: nn.AdaptiveAvgPool1d(3), (2, 3, 7)),
    "nn.AdaptiveAvgPool2d": mod(lambda: nn.AdaptiveAvgPool2d((2, 3)), (2, 3, 5, 7)),
    # ---- functions: sums and products
    "operator.add": fn(lambda a, b: a + b, X, (3, 4)),
    "operator.iadd": direct(X, X),
    "torch.add": fn(lambda a, b: torch.add(a, b, alpha=2.0), X, X),
    "operator.sub": fn(lambda a, b: a - b, X, X),
    "operator.isub": direct(X, (4,)),
    "torch.sub": fn(lambda a, b: torch.sub(a, b), X, (4,)),
    "operator.mul": fn(lambda a, b: a * b, X, (3, 4), oba=BILINEAR),
    "operator.imul": direct(X, X, oba=BILINEAR),
    "torch.mul": fn(lambda a, b: torch.mul(a, b), X, X, oba=BILINEAR),
    "operator.matmul": fn(lambda a, b: a @ b, X, (4, 5), oba=BILINEAR),
    "torch.matmul": fn(lambda a, b: torch.matmul(a, b), X, (2, 4, 5), oba=BILINEAR),
    "torch.bmm": fn(lambda a, b: torch.bmm(a, b), X, (2, 4, 5), oba=BILINEAR),
    "torch.mm": fn(lambda a, b: torch.mm(a, b), (3, 4), (4, 5), oba=BILINEAR),
    "torch.einsum": fn(lambda a, b: torch.einsum("bij,bjk->bik", a, b), X, (2, 4, 5),
                       oba=BILINEAR),
    "F.linear": fn(lambda x, w: F.linear(x, w), X, (5, 4), oba=BILINEAR),  # + a bias: refused (report)
    "torch.conv1d": fn(lambda x, w: F.conv1d(x, w, padding=1), (2, 3, 6), (4, 3, 3), oba=BILINEAR),
    "torch.conv2d": fn(lambda x, w: F.conv2d(x, w, stride=2), (2, 3, 5, 5), (4, 3, 3, 3),
                       oba=BILINEAR),
    "torch.cat": fn(lambda a, b: torch.cat([a, b], 1), X, (2, 2, 4)),
    "torch.concat": fn(lambda a, b: torch.concat([a, b], -1), X, (2, 3, 2)),
    "torch.stack": fn(lambda a, b: torch.stack([a, b], 1), X, X),
    "operator.neg": fn(lambda a: -a, X),
    "torch.neg": fn(lambda a: torch.neg(a), X),
    "operator.truediv": fn(lambda a: a / 3.0, X),
    "torch.div": fn(lambda a: torch.div(a, 0.5), X),
    "F.scaled_dot_product_attention": fn(lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
                                         (2, 2, 5, 4), (2, 2, 6, 4), (2, 2, 6, 3), oba="sdpa",
                                         generic_fn=_sdpa_math),
    # ---- functions: activations
    "torch.relu": fn(lambda x: torch.relu(x), X),
    "F.relu": fn(lambda x: F.relu(x), X),
    "torch.relu_": fn(lambda x: torch.relu_(x * 1), X),
    "F.relu6": fn(lambda x: F.relu6(3 * x), X),
    "F.hardtanh": fn(lambda x: F.hardtanh(x, -0.5, 0.5), X),
    "F.hardtanh_": fn(lambda x: F.hardtanh_(x * 1, -0.5, 0.5), X),
    "F.leaky_relu": fn(lambda x: F.leaky_relu(x, 0.2), X),
    "F.leaky_relu_": fn(lambda x: F.leaky_relu_(x * 1, 0.2), X),
    "F.gelu": fn(lambda x: F.gelu(x, approximate="tanh"), X),
    "F.silu": fn(lambda x: F.silu(x), X),
    "torch.sigmoid": fn(lambda x: torch.sigmoid(x), X),
    "F.sigmoid": direct(X),
    "torch.tanh": fn(lambda x: torch.tanh(x), X),
    "F.tanh": direct(X),
    "F.hardswish": fn(lambda x: F.hardswish(3 * x), X, generic_fn=lambda x, inplace=False: _hardswish(x)),
    "F.hardsigmoid": fn(lambda x: F.hardsigmoid(3 * x), X,
                        generic_fn=lambda x, inplace=False: _hardsigmoid(x)),
    # functional lookup into a θ-dependent table; padding_idx: that row's lookup is a constant
    "F.embedding": fn(lambda w: F.embedding(torch.tensor([[0, 1, 4], [1, 3, 1]]), w,
                                            padding_idx=1), (5, 3),
                      generic_fn=_embedding_pad_constant),
    # ---- functions: norms, shapes, pooling, metadata
    "builtins.getattr": meta(lambda x: x.shape, X),
    "F.layer_norm": fn(lambda x: F.layer_norm(x, (4,), CONST[4] + 1.5, CONST[4], 1e-5), X),
    "F.batch_norm": fn(lambda x: F.batch_norm(x, CONST[3], CONST[3].abs() + 0.5, CONST[3] + 1.5,
                                              CONST[3], False), (4, 3, 2)),
    "torch.flatten": fn(lambda x: torch.flatten(x, 1), X),
    "torch.reshape": fn(lambda x: torch.reshape(x, (4, 6)), X),
    "torch.squeeze": fn(lambda x: torch.squeeze(x, 1), (2, 1, 4)),
    "torch.unsqueeze": fn(lambda x: torch.unsqueeze(x, 0), X),
    "torch.clone": fn(lambda x: torch.clone(x), X),
    "torch.permute": fn(lambda x: torch.permute(x, (2, 0, 1)), X),
    "torch.transpose": fn(lambda x: torch.transpose(x, 0, 2), X),
    "operator.getitem": fn(lambda x: x[:, 1:, ::2], X),
    "F.dropout": fn(lambda x: F.dropout(x, 0.3, training=False), X),
    "F.dropout1d": fn(lambda x: F.dropout1d(x, 0.3, training=False), X),
    "F.dropout2d": fn(lambda x: F.dropout2d(x, 0.3, training=False), (2, 3, 4, 4)),
    "torch.chunk": fn(lambda x: torch.chunk(x, 2, -1)[1], X),
    "torch.split": fn(lambda x: torch.split(x, [1, 2], 1)[1], X),
    "torch.unbind": fn(lambda x: torch.unbind(x, 1)[2], X),
    "torch.sum": fn(lambda x: torch.sum(x, (0, 2)), X),
    "torch.mean": fn(lambda x: torch.mean(x, 1, keepdim=True), X),
    "torchvision.ops.stochastic_depth": direct(X, args=lambda p: ((p, 0.2, "row", False), {})),
    "F.max_pool1d": fn(lambda x: F.max_pool1d(x, 2), (2, 3, 6)),
    "F.max_pool2d": fn(lambda x: F.max_pool2d(x, 2, stride=1), (2, 3, 4, 4)),
    "torch.avg_pool1d": fn(lambda x: F.avg_pool1d(x, 2), (2, 3, 6)),
    "F.avg_pool2d": fn(lambda x: F.avg_pool2d(x, 2), (2, 3, 4, 4)),
    "torch.adaptive_avg_pool1d": fn(lambda x: F.adaptive_avg_pool1d(x, 4), (2, 3, 7)),
    "F.adaptive_avg_pool2d": fn(lambda x: F.adaptive_avg_pool2d(x, (2, 2)), (2, 3, 5, 4)),
    # ---- tensor methods
    "Tensor.add": fn(lambda a, b: a.add(b), X, X),
    "Tensor.add_": fn(lambda a, b: (a * 1).add_(b), X, X),
    "Tensor.sub": fn(lambda a, b: a.sub(b), X, X),
    "Tensor.sub_": fn(lambda a, b: (a * 1).sub_(b), X, X),
    "Tensor.mul": fn(lambda a, b: a.mul(b), X, X, oba=BILINEAR),
    "Tensor.mul_": fn(lambda a, b: (a + 0).mul_(b), X, X, oba=BILINEAR),
    "Tensor.matmul": fn(lambda a, b: a.matmul(b), X, (4, 2), oba=BILINEAR),
    "Tensor.bmm": fn(lambda a, b: a.bmm(b), X, (2, 4, 2), oba=BILINEAR),
    "Tensor.mm": fn(lambda a, b: a.mm(b), (3, 4), (4, 2), oba=BILINEAR),
    "Tensor.neg": fn(lambda a: a.neg(), X),
    "Tensor.div": fn(lambda a: a.div(4.0), X),
    "Tensor.relu": fn(lambda a: a.relu(), X),
    "Tensor.relu_": fn(lambda a: (a * 1).relu_(), X),
    "Tensor.sigmoid": fn(lambda a: a.sigmoid(), X),
    "Tensor.sigmoid_": fn(lambda a: (a * 1).sigmoid_(), X),
    "Tensor.tanh": fn(lambda a: a.tanh(), X),
    "Tensor.tanh_": fn(lambda a: (a * 1).tanh_(), X),
    "Tensor.size": meta(lambda a: a.size(1), X),
    "Tensor.dim": meta(lambda a: a.dim(), X),
    "Tensor.numel": meta(lambda a: a.numel(), X),
    "Tensor.view": fn(lambda a: a.view(2, 12), X),
    "Tensor.reshape": fn(lambda a: a.reshape(-1, 4), X),
    "Tensor.flatten": fn(lambda a: a.flatten(1), X),
    "Tensor.squeeze": fn(lambda a: a.squeeze(1), (2, 1, 4)),
    "Tensor.unsqueeze": fn(lambda a: a.unsqueeze(-1), X),
    "Tensor.contiguous": fn(lambda a: a.transpose(0, 1).contiguous(), X),
    "Tensor.clone": fn(lambda a: a.clone(), X),
    "Tensor.unflatten": fn(lambda a: a.unflatten(2, (2, 2)), X),
    "Tensor.view_as": fn(lambda a, b: a.view_as(b), X, (4, 6)),
    "Tensor.reshape_as": fn(lambda a, b: a.reshape_as(b), X, (6, 4)),
    "Tensor.permute": fn(lambda a: a.permute(1, 2, 0), X),
    "Tensor.transpose": fn(lambda a: a.transpose(1, 2), X),
    "Tensor.t": fn(lambda a: a.t(), (3, 4)),
    "Tensor.expand": fn(lambda a: a.expand(2, 3, 4), (1, 3, 4)),
    "Tensor.expand_as": fn(lambda a, b: a.expand_as(b), (3, 1), (2, 3, 4)),
    "Tensor.to": fn(lambda a: a.to(torch.float32), X),
    "Tensor.float": fn(lambda a: a.float(), X),
    "Tensor.double": fn(lambda a: a.float().double(), X),
    "Tensor.half": fn(lambda a: a.half(), X),
    "Tensor.bfloat16": fn(lambda a: a.bfloat16(), X),
    "Tensor.type_as": fn(lambda a, b: a.type_as(b), X, (2,)),
    "Tensor.chunk": fn(lambda a: a.chunk(3, 1)[0], X),
    "Tensor.split": fn(lambda a: a.split(2, -1)[1], X),
    "Tensor.unbind": fn(lambda a: a.unbind(0)[1], X),
    "Tensor.sum": fn(lambda a: a.sum(-1), X),
    "Tensor.mean": fn(lambda a: a.mean((1, 2)), X),
}


class Linearized:
    """Nonlinearities replaced by their first-order expansion at the values they take at the
    case's inputs (recorded on a first call): the same value and slope, no curvature — so the
    generic ``exact`` term of the result is exactly the product-rule cross terms, oba's C."""

    def __init__(self, f_of):
        self.f_of = f_of      # f_of(act) -> the op written with act(kind, s) for nonlinearities
        self.s0, self.k = [], None

    def act(self, kind, s):
        fn = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "recip": torch.reciprocal}[kind]
        if self.k is None:    # recording
            self.s0.append(s.detach())
            return fn(s)
        s0 = self.s0[self.k]
        self.k += 1
        y0 = fn(s0)
        slope = {"sigmoid": y0 * (1 - y0), "tanh": 1 - y0 * y0, "recip": -y0 * y0}[kind]
        return y0 + slope * (s - s0)

    def factory(self, inputs):
        self.s0, self.k = [], None
        self.f_of(self.act)(*inputs)

        def f(*xs):
            self.k = 0
            return self.f_of(self.act)(*xs)
        return f


def _plain(kind, s):
    return {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "recip": torch.reciprocal}[kind](s)


def _lstm_cell(m, act, x, h, c=None):
    if c is None:   # called as the module is: (x, (h, c))
        h, c = h
    gates = F.linear(x, m.weight_ih, m.bias_ih) + F.linear(h, m.weight_hh, m.bias_hh)
    i, f, g, o = gates.chunk(4, -1)
    c2 = act("sigmoid", f) * c + act("sigmoid", i) * act("tanh", g)
    return act("sigmoid", o) * act("tanh", c2), c2


def _gru_cell(m, act, x, h):
    gi, gh = F.linear(x, m.weight_ih, m.bias_ih), F.linear(h, m.weight_hh, m.bias_hh)
    ir, iz, inn = gi.chunk(3, -1)
    hr, hz, hn = gh.chunk(3, -1)
    r, z = act("sigmoid", ir + hr), act("sigmoid", iz + hz)
    n = act("tanh", inn + r * hn)
    return (1 - z) * n + z * h


class _Cell:   # nn.LSTM / nn.GRU weights (layer 0) seen as a cell
    def __init__(self, m):
        self.weight_ih, self.weight_hh = m.weight_ih_l0, m.weight_hh_l0
        self.bias_ih, self.bias_hh = m.bias_ih_l0, m.bias_hh_l0


def lstm_cell_of(m):
    return lambda act: (lambda x, h, c=None: _lstm_cell(m, act, x, h, c))


def gru_cell_of(m):
    return lambda act: (lambda x, h: _gru_cell(m, act, x, h))


def lstm_seq_of(m):
    def of(act):
        def f(x):   # batch_first, zero initial state
            cell = _Cell(m)
            h = x.new_zeros(x.shape[0], m.hidden_size)
            c = x.new_zeros(x.shape[0], m.hidden_size)
            outs = []
            for t in range(x.shape[1]):
                h, c = _lstm_cell(cell, act, x[:, t], h, c)
                outs.append(h)
            return torch.stack(outs, 1), (h[None], c[None])
        return f
    return of


def gru_seq_of(m):
    def of(act):
        def f(x):
            cell = _Cell(m)
            h = x.new_zeros(x.shape[0], m.hidden_size)
            outs = []
            for t in range(x.shape[1]):
                h = _gru_cell(cell, act, x[:, t], h)
                outs.append(h)
            return torch.stack(outs, 1), h[None]
        return f
    return of


def _glu_of(dim):
    return lambda act: (lambda x: (lambda a, b: a * act("sigmoid", b))(*x.chunk(2, dim)))


def lin(of, module_of=None):
    """oba expectation: product-rule cross terms of ``of`` with nonlinearities linearized;
    ``module_of(m)`` builds ``of`` from the case's module."""
    return ("lin", of, module_of)


def gen(of, module_of=None):
    """The generic rule differentiates ``of(plain)`` (the op written out)."""
    if module_of is not None:
        return lambda m: (lambda *a, **k: module_of(m)(_plain)(*a))
    return lambda *a, **k: of(_plain)(*a)


_E = (2, 4, 3)
BAG_IDX = torch.tensor([[0, 3, 1, 6], [2, 2, 5, 0]])


def _bag_sum(input, weight, offsets=None, per_sample_weights=None, **kwargs):
    """``F.embedding_bag(input (B, N), weight, mode="sum", per_sample_weights=p)`` by hand."""
    return (F.embedding(input, weight) * per_sample_weights.unsqueeze(-1)).sum(1)


MORE_CASES = {
    # products (bilinear in two θ-dependent inputs)
    "torch.dot": fn(lambda a, b: torch.dot(a, b), (5,), (5,), oba=BILINEAR),
    "Tensor.dot": fn(lambda a, b: a.dot(b), (5,), (5,), oba=BILINEAR),
    "torch.ger": fn(lambda a, b: torch.ger(a, b), (3,), (4,), oba=BILINEAR),
    "Tensor.ger": fn(lambda a, b: a.ger(b), (3,), (4,), oba=BILINEAR),
    "Tensor.outer": fn(lambda a, b: a.outer(b), (3,), (4,), oba=BILINEAR),
    "torch.inner": fn(lambda a, b: torch.inner(a, b), X, (5, 4), oba=BILINEAR),
    "Tensor.inner": fn(lambda a, b: a.inner(b), X, (5, 4), oba=BILINEAR),
    "torch.mv": fn(lambda a, b: torch.mv(a, b), (3, 4), (4,), oba=BILINEAR),
    "Tensor.mv": fn(lambda a, b: a.mv(b), (3, 4), (4,), oba=BILINEAR),
    "torch.addcmul": fn(lambda x, a, b: torch.addcmul(x, a, b, value=0.5), X, X, X, oba=BILINEAR),
    "Tensor.addcmul": fn(lambda x, a, b: x.addcmul(a, b), X, X, X, oba=BILINEAR),
    "torch.addmm": fn(lambda x, a, b: torch.addmm(x, a, b, beta=0.5, alpha=2.0), (3, 5), (3, 4),
                      (4, 5), oba=BILINEAR),
    "Tensor.addmm": fn(lambda x, a, b: x.addmm(a, b), (3, 5), (3, 4), (4, 5), oba=BILINEAR),
    "torch.addmv": fn(lambda x, a, b: torch.addmv(x, a, b), (3,), (3, 4), (4,), oba=BILINEAR),
    "Tensor.addmv": fn(lambda x, a, b: x.addmv(a, b), (3,), (3, 4), (4,), oba=BILINEAR),
    "torch.addr": fn(lambda x, a, b: torch.addr(x, a, b), (3, 4), (3,), (4,), oba=BILINEAR),
    "Tensor.addr": fn(lambda x, a, b: x.addr(a, b), (3, 4), (3,), (4,), oba=BILINEAR),
    "torch.addbmm": fn(lambda x, a, b: torch.addbmm(x, a, b), (3, 5), (2, 3, 4), (2, 4, 5),
                       oba=BILINEAR),
    "Tensor.addbmm": fn(lambda x, a, b: x.addbmm(a, b), (3, 5), (2, 3, 4), (2, 4, 5),
                        oba=BILINEAR),
    "torch.baddbmm": fn(lambda x, a, b: torch.baddbmm(x, a, b), (2, 3, 5), (2, 3, 4), (2, 4, 5),
                        oba=BILINEAR),
    "Tensor.baddbmm": fn(lambda x, a, b: x.baddbmm(a, b), (2, 3, 5), (2, 3, 4), (2, 4, 5),
                         oba=BILINEAR),
    "torch.bilinear": fn(lambda a, b: torch.bilinear(a, b, CONST_W, CONST[5]), (3, 4), (3, 2),
                         oba=BILINEAR),
    "nn.Bilinear": Case(lambda m, a, b: m(a, b), [(3, 4), (3, 2)], BILINEAR,
                        module=lambda: nn.Bilinear(4, 2, 5).double()),
    # products with nonlinearities: cross terms with the nonlinearities linearized
    "F.glu": Case(lambda x: F.glu(x, -1), [(2, 3, 6)], oba=lin(_glu_of(-1)),
                  generic_fn=gen(_glu_of(-1))),
    "nn.GLU": Case(lambda m, x: m(x), [(2, 6, 3)], oba=lin(_glu_of(1)),
                   module=lambda: nn.GLU(1), generic_fn=lambda m: gen(_glu_of(1))),
    # division is linearized like any op that is not a product (reference/decompose.py,
    # SPEC §2): addcdiv carries no OBA curvature
    "torch.addcdiv": fn(lambda x, a, b: torch.addcdiv(x, a, b, value=0.5), X, X, X, positive=(2,)),
    "Tensor.addcdiv": fn(lambda x, a, b: x.addcdiv(a, b), X, X, X, positive=(2,)),
    "torch.outer": fn(lambda a, b: torch.outer(a, b), (3,), (4,), oba=BILINEAR),
    # multilinear in their elements / matrices: all second-order terms are product-rule terms
    "torch.prod": fn(lambda x: torch.prod(x, 1), X, oba=BILINEAR),
    "Tensor.prod": fn(lambda x: x.prod(), (2, 3), oba=BILINEAR),
    "torch.cumprod": fn(lambda x: torch.cumprod(x, 1), X, oba=BILINEAR),
    "Tensor.cumprod": fn(lambda x: x.cumprod(-1), X, oba=BILINEAR),
    "torch._C._linalg.linalg_multi_dot": fn(lambda a, b, c: torch.linalg.multi_dot([a, b, c]),
                                             (3, 4), (4, 5), (5, 2), oba=BILINEAR),
    "torch.chain_matmul": fn(lambda a, b, c: torch.chain_matmul(a, b, c), (3, 4), (4, 5), (5, 2),
                             oba=BILINEAR),
    "torch.tensordot": fn(lambda a, b: torch.tensordot(a, b, dims=([1, 2], [0, 1])), X, (3, 4, 2),
                          oba=BILINEAR),
    "nn.LSTMCell": Case(lambda m, x, h, c: m(x, (h, c)), [(3, 4), (3, 5), (3, 5)],
                        oba=lin(None, lstm_cell_of), module=lambda: nn.LSTMCell(4, 5).double(),
                        generic_fn=lambda m: gen(None, lstm_cell_of)(m)),
    "nn.GRUCell": Case(lambda m, x, h: m(x, h), [(3, 4), (3, 5)], oba=lin(None, gru_cell_of),
                       module=lambda: nn.GRUCell(4, 5).double(),
                       generic_fn=lambda m: gen(None, gru_cell_of)(m)),
    "nn.LSTM": Case(lambda m, x: m(x), [(2, 3, 4)], oba=lin(None, lstm_seq_of),
                    module=lambda: nn.LSTM(4, 5, batch_first=True).double(),
                    generic_fn=lambda m: gen(None, lstm_seq_of)(m)),
    "nn.GRU": Case(lambda m, x: m(x), [(2, 3, 4)], oba=lin(None, gru_seq_of),
                   module=lambda: nn.GRU(4, 5, batch_first=True).double(),
                   generic_fn=lambda m: gen(None, gru_seq_of)(m)),
    # no product of two θ-dependent values (weights constant): linear expectation
    "nn.RNNCell": mod(lambda: nn.RNNCell(4, 5).double(), (3, 4)),
    "nn.RNN": mod(lambda: nn.RNN(4, 5, batch_first=True).double(), (2, 3, 4)),
    "nn.ConvTranspose1d": mod(lambda: nn.ConvTranspose1d(3, 4, 3, stride=2).double(), (2, 3, 5)),
    "nn.ConvTranspose2d": mod(lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1,
                                                         output_padding=1).double(), (2, 3, 4, 4)),
    "nn.Embedding": Case(lambda m, i: m(i), [(2, 5)], module=lambda: nn.Embedding(7, 3).double(),
                         int_inputs=7),
    # embedding bags written out (torch's bag has no forward-mode AD): bilinear in the table and
    # the per-sample weights; a module's table is a constant, so linear in the weights
    "F.embedding_bag": fn(lambda w, p: F.embedding_bag(BAG_IDX, w, mode="sum",
                                                       per_sample_weights=p),
                          (7, 3), BAG_IDX.shape, oba=BILINEAR, generic_fn=_bag_sum),
    "nn.EmbeddingBag": Case(lambda m, p: m(BAG_IDX, per_sample_weights=p), [BAG_IDX.shape],
                            module=lambda: nn.EmbeddingBag(7, 3, mode="sum").double(),
                            generic_fn=lambda m: (lambda i, **k: _bag_sum(i, m.weight, **k))),
    # inactive random ops (eval / training=False): the identity
    "F.dropout3d": fn(lambda x: F.dropout3d(x, 0.3, training=False), (2, 3, 2, 2, 2)),
    "nn.Dropout3d": mod(lambda: nn.Dropout3d(0.3).eval(), (2, 3, 2, 2, 2)),
    "F.alpha_dropout": fn(lambda x: F.alpha_dropout(x, 0.3, training=False), X),
    "F.feature_alpha_dropout": fn(lambda x: F.feature_alpha_dropout(x, 0.3, training=False), X),
    "nn.AlphaDropout": mod(lambda: nn.AlphaDropout(0.3).eval(), X),
    "nn.FeatureAlphaDropout": mod(lambda: nn.FeatureAlphaDropout(0.3).eval(), X),
}
CONST_W = torch.linspace(-1, 1, 5 * 4 * 2, dtype=torch.float64).reshape(5, 4, 2)
CASES.update(MORE_CASES)
CASES.update(_discrete_cases())
if _hf_utils is not None:  # Hugging Face Conv1D(nf=5, nx=4): weight (4, 5), a transposed Linear
    CASES["transformers.pytorch_utils.Conv1D"] = mod(lambda: _hf_utils.Conv1D(5, 4).double(), X)


def test_every_rule_has_a_case():
    """A rule no test reaches is a failure: add a case for it to CASES (module docstring)."""
    entries = registry_entries()
    missing = sorted(set(entries) - set(CASES))
    lines = [f'    "{n}": fn(lambda x: <a call of {n} on x>, <input shape>, '
             f'oba=<LINEAR, BILINEAR or a softmax-linearized factory>),  # {type(entries[n][2]).__name__}'
             for n in missing]
    assert not missing, ("registered rules without a case in tests/test_rule_registry.py; add to "
                         "CASES (use mod(...) for a module, meta(...) for Python-valued ops):\n"
                         + "\n".join(lines))
    stale = sorted(set(CASES) - set(entries))
    assert not stale, f"CASES entries with no registered rule (renamed? removed?): {stale}"


# ------------------------------------------------------------------ running one rule
class _Recorder(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.values = {}

    def run_node(self, n):
        v = super().run_node(n)
        self.values[n] = v
        return v


def _node_for(name, registry, key, rule, gm):
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        if registry == "module" and node.op == "call_module" and type(modules[node.target]) is key:
            pass
        elif registry == "function" and node.op == "call_function" and node.target is key:
            pass
        elif registry == "method" and node.op == "call_method" and node.target == key:
            pass
        else:
            continue
        assert R.lookup(node, modules) is rule, f"{name}: the registry resolves another rule"
        return node, modules
    raise AssertionError(f"{name}: the case's function has no {registry} node for it; graph:\n"
                         f"{gm.graph}")


def _rand_like_tree(tree, g):
    def one(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
        return None
    return pytree.tree_map(one, tree)


def _leaves(x):
    return [t for t in pytree.tree_leaves(x)]


def _same(got, want, what):
    """Trees of tensors (None = zero) equal to FLOAT64_RTOL per tensor."""
    gl, wl = pytree.tree_leaves(got), pytree.tree_leaves(want)
    if got is None and want is None:
        return
    if got is None or want is None:
        t = want if got is None else got
        for x in _leaves(t):
            if isinstance(x, torch.Tensor):
                assert not x.double().abs().max() > 0, f"{what}: None on one side, nonzero on the other"
        return
    if isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor):
        gl, wl = [got], [want]
    assert len(gl) == len(wl), f"{what}: {len(gl)} vs {len(wl)} outputs"
    for i, (a, b) in enumerate(zip(gl, wl)):
        if a is None or b is None:
            _same(a, b, f"{what}[{i}]")
            continue
        if not isinstance(a, torch.Tensor):
            assert a == b, f"{what}[{i}]: {a!r} != {b!r}"
            continue
        assert a.dtype == b.dtype, f"{what}[{i}]: dtype {a.dtype} != {b.dtype}"
        assert_f64(a, b, f"{what}[{i}]")


def _ctx(node, needs, n_inputs):
    ctx = _Ctx(node.name, None, (), True, True, needs, None)
    ctx.input_nodes = [None] * n_inputs
    ctx.sublayer = lambda name: None
    return ctx


def _fill_none(g, ref):
    """``g`` with None leaves replaced by zeros shaped like ``ref``'s leaves."""
    if g is None:
        return pytree.tree_map(lambda r: torch.zeros_like(r) if isinstance(r, torch.Tensor)
                               else r, ref)
    if isinstance(g, (tuple, list)):
        return type(g)(_fill_none(a, b) for a, b in zip(g, ref))
    return g


def _second_term(f, primals, tans, g):
    """jvp along T of x ↦ vjp(f, x)(G): the op's own second-order term (per primal)."""
    def gx_of(*xs):
        return torch.func.vjp(f, *xs)[1](g)
    return torch.func.jvp(gx_of, primals, tans)[1]


class _Wrapper(nn.Module):
    def __init__(self, case):
        super().__init__()
        self.f = case.f
        self.m = case.module() if case.module is not None else None

    def call(self, *xs):
        return self.f(self.m, *xs) if self.m is not None else self.f(*xs)


class _W1(_Wrapper):
    def forward(self, a):
        return self.call(a)


class _W2(_Wrapper):
    def forward(self, a, b):
        return self.call(a, b)


class _W3(_Wrapper):
    def forward(self, a, b, c):
        return self.call(a, b, c)


def _wrapper(case):
    """fx traces fixed positional arguments only (no *args)."""
    return {1: _W1, 2: _W2, 3: _W3}[len(case.shapes)](case)


#: in-place ops: the engine computes out of place; the generic rule differentiates this
OUT_OF_PLACE = {torch.relu_: torch.relu, F.hardtanh_: F.hardtanh, F.leaky_relu_: F.leaky_relu,
                operator.iadd: operator.add, operator.isub: operator.sub,
                operator.imul: operator.mul}


def _graph(name, case, registry, key, inputs):
    """(GraphModule, node values) with the node of the entry under test."""
    if case.direct is None:
        w = _wrapper(case)
        gm = fx.GraphModule(w, _Tracer().trace(w))
    else:
        graph = fx.Graph()
        tracer = fx.proxy.GraphAppendingTracer(graph)
        ph = [fx.Proxy(graph.placeholder(f"x{i}"), tracer) for i in range(len(case.shapes))]
        args, kwargs = pytree.tree_map(lambda a: a.node if isinstance(a, fx.Proxy) else a,
                                       case.direct(*ph))
        make = graph.call_method if registry == "method" else graph.call_function
        graph.output(make(key, tuple(args), dict(kwargs)))
        gm = fx.GraphModule(nn.Module(), graph)
    rec = _Recorder(gm)
    rec.run(*inputs)
    return gm, rec.values


@pytest.mark.parametrize("name", sorted(CASES))
@torch.no_grad()  # as in the sweep (engine/sweep.py): rules run without autograd recording
def test_rule_matches_the_generic_rule(name):
    entries = registry_entries()
    if name not in entries:
        pytest.fail(f"{name}: in CASES but not registered (see test_every_rule_has_a_case)")
    registry, key, rule = entries[name]
    case = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    inputs = []
    for k, s in enumerate(case.shapes):
        if case.int_inputs:
            inputs.append(torch.randint(0, case.int_inputs, s, generator=g))
            continue
        t = torch.randn(s, generator=g, dtype=torch.float64)
        inputs.append(t.abs() + 0.5 if k in case.positive else t)
    gm, values = _graph(name, case, registry, key, inputs)
    node, modules = _node_for(name, registry, key, rule, gm)
    flat, spec = pytree.tree_flatten((tuple(node.args), dict(node.kwargs)))
    leaves = [values[a] if isinstance(a, fx.Node) else a for a in flat]
    slots = [i for i, a in enumerate(flat) if isinstance(a, fx.Node)
             and isinstance(leaves[i], torch.Tensor)]
    module = modules[node.target] if node.op == "call_module" else None
    if node.op == "call_module":
        fnc = module
    elif node.op == "call_function":
        fnc = node.target
    else:
        fnc = getattr(torch.Tensor, node.target)
    gfn = fnc
    if case.generic_fn is not None:
        gfn = case.generic_fn(module) if module is not None else case.generic_fn
    elif case.oba == "mha":
        math_f = mha_math(module)
        gfn = lambda q, k, v, **kw: math_f(q, k, v)  # noqa: E731  (output 0 of the module)
    elif node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("__"):
        gfn = getattr(torch.Tensor, node.target[:-1])
    elif node.op == "call_function" and node.target in OUT_OF_PLACE:
        gfn = OUT_OF_PLACE[node.target]
    xs = [leaves[i] for i in slots]
    # only values computed from the inputs carry tangents/cotangents; constants do not
    live = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in live for a in n.all_input_nodes):
            live.add(n)
    act = [flat[i] in live and leaves[i].is_floating_point() for i in slots]
    tangents = [torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype) if a else None
                for x, a in zip(xs, act)]
    needs = act

    def new_call(f):
        fresh = [t.clone() if isinstance(t, torch.Tensor) else t for t in leaves]  # in-place ops
        args, kwargs = pytree.tree_unflatten(fresh, spec)
        return R.Call(node, module, f, args, kwargs, fresh, spec, slots, list(tangents), needs)

    ctx_r, ctx_g = _ctx(node, needs, len(xs)), _ctx(node, needs, len(xs))
    y_r, t_r = rule.forward(new_call(fnc), ctx_r)
    if case.metadata:   # Python values or discrete tensors: the op's own value, no streams
        args, kwargs = pytree.tree_unflatten(leaves, spec)
        want = fnc(*args, **kwargs)
        assert t_r is None, (name, t_r)
        if isinstance(want, torch.Tensor):
            assert y_r.shape == want.shape and y_r.dtype == want.dtype, (name, y_r, want)
            assert case.arbitrary_values or torch.equal(y_r, want), (name, y_r, want)
        else:
            assert y_r == want, (name, y_r, want)
        for mode in (None, "oba", "exact"):
            ctx_r.mode, ctx_r.exact, ctx_r.first = mode, mode == "exact", True
            res = rule.backward(ctx_r, None, None)
            assert all(r is None for r in res), f"{name}: a discrete op returned a cotangent"
        return
    generic = GenericRule(warn=False)
    y_g, t_g = generic.forward(new_call(gfn), ctx_g)
    tuple_out = case.oba == "mha"   # (attn_output, None) from the module, attn_output from gfn
    if tuple_out:
        assert isinstance(y_r, tuple) and y_r[1] is None and (t_r is None or t_r[1] is None)
    _same(y_r[0] if tuple_out else y_r, y_g, f"{name} forward y")
    _same(t_r[0] if tuple_out else t_r, t_g, f"{name} forward tangent T_y")

    gy, cy = _rand_like_tree(y_g, g), _rand_like_tree(y_g, g)
    for mode in (None, "oba", "exact"):
        for ctx in (ctx_r, ctx_g):
            ctx.mode, ctx.exact, ctx.first = mode, mode == "exact", True
        c = cy if mode is not None else None
        res_r = (rule.backward(ctx_r, [gy, None], None if c is None else [c, None]) if tuple_out
                 else rule.backward(ctx_r, gy, c))
        res_g = generic.backward(ctx_g, gy, c)
        assert len(res_r) == len(xs), f"{name}: backward returned {len(res_r)} entries for {len(xs)} inputs"
        want_c = [None if r is None else r[1] for r in res_g]
        if mode == "oba" and case.oba != LINEAR:
            # oba = the linearized stream vjp(C) + the product-rule (cross) terms of the products
            ctx_x = _ctx(node, needs, len(xs))
            generic.forward(new_call(gfn), ctx_x)
            ctx_x.mode, ctx_x.exact, ctx_x.first = "exact", True, True
            if case.oba == BILINEAR:   # bilinear: its whole second-order term is cross terms
                res_x = generic.backward(ctx_x, gy, c)
                want_c = [None if r is None else r[1] for r in res_x]
            else:                       # cross terms with the nonlinearities linearized
                if isinstance(case.oba, tuple):
                    _, of, module_of = case.oba
                    factory = Linearized(module_of(module) if module_of else of).factory
                else:
                    factory = sdpa_lin if case.oba == "sdpa" else mha_lin_factory(module)
                active = ctx_x.active
                prim = tuple(xs[i] for i in active)
                tans = tuple(tangents[i] for i in active)
                gfill = gy
                f_lin = factory(xs)
                if len(active) < len(xs):   # f_lin takes every tensor input; fix the others
                    f_full = f_lin

                    def f_lin(*act_xs):
                        full = list(xs)
                        for i, v in zip(active, act_xs):
                            full[i] = v
                        return f_full(*full)
                extra = _second_term(f_lin, prim, tans, _fill_none(gfill, y_g))
                want_c = list(want_c)
                for k, i in enumerate(active):
                    want_c[i] = extra[k] if want_c[i] is None else want_c[i] + extra[k]
        for i in range(len(xs)):
            if not needs[i]:
                continue
            got_i, want_i = res_r[i], res_g[i]
            gr = None if got_i is None else got_i[0]
            cr = None if got_i is None else got_i[1]
            _same(gr, None if want_i is None else want_i[0], f"{name} [{mode}] G of input {i}")
            if mode is None:
                assert cr is None or not cr.abs().max() > 0, f"{name}: C without a second stream"
            else:
                _same(cr, want_c[i], f"{name} [{mode}] C of input {i}")


def test_a_wrong_rule_is_caught(monkeypatch):
    """The check above is not vacuous: a product rule that forgets its cross terms (the plain
    linearization) and an activation whose C is off by 1e-4 both fail it."""
    monkeypatch.setitem(R.METHOD_RULES, "mul", GenericRule(warn=False))
    with pytest.raises(AssertionError, match=r"Tensor.mul \[oba\] C"):
        test_rule_matches_the_generic_rule("Tensor.mul")

    class OffByE4(GenericRule):
        def backward(self, ctx, g, c):
            return [None if o is None else (o[0], None if o[1] is None else o[1] * (1 + 1e-4))
                    for o in super().backward(ctx, g, c)]
    monkeypatch.setitem(R.METHOD_RULES, "tanh", OffByE4(warn=False))
    with pytest.raises(AssertionError, match=r"Tensor.tanh \[(oba|exact)\] C"):
        test_rule_matches_the_generic_rule("Tensor.tanh")
