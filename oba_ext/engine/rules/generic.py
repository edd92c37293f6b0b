"""The generic rule for ops without a hand-written rule: ``torch.func`` per stream.

    forward:  (y, T_y) = jvp(f, x, T)                       (T = 0 where None)
    backward: G_x = vjp(f, x)(G);  C_x = vjp(f, x)(C)
              + for ``exact``: jvp of ``x ↦ vjp(f, x)(G)`` along T  (the op's own curvature)

What it is right for (decided per op, SPEC §2/§8):

- ``taylor`` and ``exact``: any differentiable, deterministic op (the JVP, VJP and jvp-of-vjp
  are the op's true derivatives).
- ``oba``: only ops that contain **no product of two θ-dependent values**: for them the
  ``oba`` recursion is the plain JVP/VJP. Those ops are listed here (:data:`SAFE_FUNCTIONS`,
  :data:`SAFE_METHODS`, :data:`SAFE_MODULES`; an allow-list, by the project's convention that
  elementwise functions of one value, division, softmax, normalizations and reductions other
  than products are linearized, SPEC §2). Ops in :data:`SAFE_IF_ONE_STREAM` are safe while at
  most one of their floating inputs carries a stream (``F.group_norm(x, w)`` multiplies ``x``'s
  normalization by ``w``: a product when ``w`` is θ-dependent too). Any other op without a rule
  is refused in an ``oba`` run: :func:`oba_refusal` names it at capture time
  (``build_scorer(..., quantities=...)``), and the rule raises ``CaptureError`` at run time
  should it be reached anyway — so ``impl="auto"`` falls back to the reference path and
  ``impl="kernel"`` raises, never a silently linearized product.
- ops that draw random numbers (:data:`RANDOM_OPS`) are refused in every mode: re-running
  them for the VJP would draw again.

Values that are not floating point (masks, indices) carry no stream: their inputs get no
cotangent from them and they get no tangent (SPEC §8). Only floating inputs that carry a
tangent or need a cotangent are differentiated; tuple outputs are supported (``G``/``C`` per
element, ``None`` = zero; non-floating elements get none). The first use of each op warns once,
naming it and saying which kinds it is exact for.
"""
from __future__ import annotations

import builtins
import operator
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from ...errors import RefusedError
from .autodiff import is_float, op_of, streamed_inputs

_WARNED = set()

# ---------------------------------------------------------------------------------------------
# The allow-list for oba: ops known to contain no product of two θ-dependent values
# ---------------------------------------------------------------------------------------------
_ELEMENTWISE = (
    "abs", "absolute", "acos", "arccos", "acosh", "arccosh", "asin", "arcsin", "asinh", "arcsinh",
    "atan", "arctan", "atanh", "arctanh", "ceil", "clamp", "clip", "clamp_min", "clamp_max",
    "cos", "cosh", "deg2rad", "rad2deg", "digamma", "erf", "erfc", "erfinv", "exp", "exp2",
    "expm1", "fix", "floor", "frac", "lgamma", "log", "log10", "log1p", "log2", "logit",
    "nan_to_num", "neg", "negative", "positive", "pow", "float_power", "reciprocal", "round",
    "rsqrt", "sigmoid", "sign", "sgn", "sin", "sinc", "sinh", "sqrt", "square", "tan", "tanh",
    "trunc", "i0", "mvlgamma", "polygamma",
    # two-operand ops that are not products (division is linearized, SPEC §2)
    "div", "divide", "true_divide", "atan2", "arctan2", "hypot", "maximum", "minimum", "fmax",
    "fmin", "fmod", "remainder", "where", "masked_fill", "logaddexp", "logaddexp2", "copysign",
    "sub", "subtract", "add", "rsub",
    # reductions and scans without products
    "sum", "nansum", "mean", "nanmean", "amax", "amin", "max", "min", "logsumexp", "cumsum",
    "var", "std", "var_mean", "std_mean", "norm", "median", "nanmedian", "cummax", "cummin",
    "logcumsumexp", "aminmax",
    # softmax family (a division, linearized like attention's softmax)
    "softmax", "log_softmax",
    # shape, indexing and copying
    "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "contiguous", "clone",
    "permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t", "T", "mT",
    "expand", "expand_as", "repeat", "repeat_interleave", "tile", "roll", "flip", "fliplr",
    "flipud", "rot90", "narrow", "select", "index_select", "gather", "take", "take_along_dim",
    "masked_select", "diagonal", "diag", "diag_embed", "tril", "triu", "chunk", "split",
    "tensor_split", "split_with_sizes", "unbind", "cat", "concat", "concatenate", "stack",
    "hstack", "vstack", "dstack", "sort", "topk", "kthvalue", "unfold", "view_as", "reshape_as",
    "detach", "to", "float", "double", "half", "bfloat16", "type_as", "type", "cpu", "cuda",
    "scatter", "scatter_add", "index_add", "index_copy", "index_put", "masked_scatter",
    "index_fill", "pad", "broadcast_to", "atleast_1d", "atleast_2d", "atleast_3d",
    "real", "imag", "conj", "resolve_conj", "resolve_neg",
    # comparisons and other non-floating results carry no stream at all
    "eq", "ne", "lt", "le", "gt", "ge", "isnan", "isinf", "isfinite", "isclose", "argmax",
    "argmin", "argsort", "logical_and", "logical_or", "logical_not", "logical_xor", "signbit",
    "bucketize", "searchsorted", "count_nonzero", "nonzero", "any", "all", "long", "int",
    "bool", "short", "byte", "char",
)

#: tensor methods (fx ``call_method`` targets) with no hidden product
SAFE_METHODS = frozenset(_ELEMENTWISE) | frozenset(
    n + "_" for n in ("abs", "clamp", "clip", "exp", "log", "neg", "pow", "sqrt", "rsqrt",
                      "sigmoid", "tanh", "sin", "cos", "reciprocal", "div", "sub", "add",
                      "masked_fill", "square", "floor", "ceil", "round", "erf", "zero", "fill"))
SAFE_METHODS = SAFE_METHODS | {"size", "dim", "numel", "new_zeros", "new_ones", "new_empty",
                               "new_full", "new_tensor", "zero_", "fill_"}

_FN_SOURCES = (torch, torch.special, torch.linalg, F)


def _resolve(names):
    out = set()
    for n in names:
        for mod in _FN_SOURCES:
            f = getattr(mod, n, None)
            if callable(f):
                out.add(f)
    return out


#: functions (fx ``call_function`` targets) with no hidden product
SAFE_FUNCTIONS = frozenset(_resolve(_ELEMENTWISE) | _resolve((
    "softplus", "elu", "selu", "celu", "mish", "softsign", "tanhshrink", "hardshrink",
    "softshrink", "threshold", "rrelu", "logsigmoid", "softmin", "normalize",
    "interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "pixel_shuffle",
    "pixel_unshuffle", "channel_shuffle", "fold", "avg_pool3d", "adaptive_avg_pool3d",
    "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "lp_pool1d", "lp_pool2d", "vector_norm", "matrix_norm", "zeros_like", "ones_like",
    "empty_like", "full_like", "one_hot", "embedding", "erfcx", "expit", "log_ndtr", "ndtr", "ndtri", "gammaln", "entr", "i0e", "i1", "i1e", "sinc",
)) | {operator.add, operator.sub, operator.neg, operator.pos, operator.truediv,
      operator.floordiv, operator.mod, operator.getitem, operator.eq, operator.ne,
      operator.lt, operator.le, operator.gt, operator.ge, operator.not_, operator.invert,
      operator.and_, operator.or_, operator.xor, operator.abs, operator.pow, builtins.getattr,
      builtins.abs})

#: functions safe while at most one floating input carries a stream (a second one would be
#: multiplied: a norm's affine weight, a pad value, an interpolation weight, ``pow(a, b)``…)
SAFE_IF_ONE_STREAM = frozenset(_resolve((
    "layer_norm", "group_norm", "instance_norm", "batch_norm", "rms_norm", "local_response_norm",
    "lerp", "prelu", "xlogy", "embedding", "normalize",
)))

#: modules (class along the MRO) with no hidden product and no θ-dependent parameter use
SAFE_MODULES = tuple(c for c in (
    nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softplus, nn.ELU, nn.SELU, nn.CELU, nn.Mish,
    nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.LogSigmoid,
    nn.PReLU, nn.ReLU6, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.PixelShuffle, nn.PixelUnshuffle, getattr(nn, "ChannelShuffle", None), nn.ZeroPad2d,
    nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.AvgPool3d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool3d, nn.LPPool1d, nn.LPPool2d, nn.Fold, nn.Unfold,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm,
    getattr(nn, "RMSNorm", None), nn.Embedding, nn.PairwiseDistance,
    nn.Identity, nn.Flatten, nn.Unflatten,
) if c is not None)

_RANDOM_NAMES = ("bernoulli", "bernoulli_", "multinomial", "normal", "normal_", "uniform_",
                 "exponential_", "geometric_", "cauchy_", "log_normal_", "random_", "poisson",
                 "rand_like", "randn_like", "randint_like", "dropout", "dropout1d", "dropout2d",
                 "dropout3d", "alpha_dropout", "feature_alpha_dropout", "rrelu", "rrelu_",
                 "gumbel_softmax", "native_dropout", "fused_dropout", "feature_dropout")
#: ops that draw random numbers (refused in every mode unless a rule handles them)
RANDOM_FUNCTIONS = frozenset(_resolve(_RANDOM_NAMES))
RANDOM_METHODS = frozenset(_RANDOM_NAMES)
RANDOM_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                  nn.FeatureAlphaDropout, nn.RReLU)


def _target_name(node) -> str:
    t = node.target
    if node.op == "call_method":
        return f"tensor method .{t}()"
    return f"function {getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', repr(t))}"


def op_name(call) -> str:
    node = call.node
    if node.op == "call_module":
        return f"module {type(call.module).__name__} ({node.target})"
    return _target_name(node)


def _node_in(node, module, module_test, methods, functions) -> bool:
    """Whether an fx ``node`` is one of a set of ops: a module call whose ``module`` passes
    ``module_test``, a method call named in ``methods``, or a function call whose target is in
    ``functions`` (an unhashable target is in none)."""
    if node.op == "call_module":
        return module_test(module)
    if node.op == "call_method":
        return node.target in methods
    try:
        return node.target in functions
    except TypeError:
        return False


def _is_random(node, module) -> bool:
    return _node_in(node, module, lambda m: isinstance(m, RANDOM_MODULES) and m.training,
                    RANDOM_METHODS, RANDOM_FUNCTIONS)


def _safe_kind(node, module) -> Optional[str]:
    """``"any"`` (no product whatever its inputs), ``"one"`` (no product while at most one
    floating input carries a stream) or ``None`` (not known to be product-free)."""
    if node.op == "call_module":
        return "any" if isinstance(module, SAFE_MODULES) else None
    if node.op == "call_method":
        return "any" if node.target in SAFE_METHODS else None
    try:
        if node.target in SAFE_IF_ONE_STREAM:
            return "one"
        if node.target in SAFE_FUNCTIONS:
            return "any"
    except TypeError:
        return None
    return None


def _refusal_text(name: str) -> str:
    return (f"{name} has no engine rule and is not known to be free of products of two "
            f"θ-dependent values, so its oba curvature (SPEC §8) cannot be computed by the "
            f"generic torch.func rule (it would be silently linearized); write the product "
            f"out (a * b, matmul, ...), or score it with impl='reference'")


def _reference_refuses(node) -> bool:
    """Whether the reference path refuses the op of fx ``node`` in an ``oba`` run too (its
    :data:`~oba_ext.reference.decompose.PRODUCT_REFUSALS`: det, kron, inv, ...)."""
    from ...reference.decompose import PRODUCT_REFUSALS
    t = node.target
    if node.op == "call_method":
        t = getattr(torch.Tensor, t, None)
    elif node.op != "call_function":
        return False
    try:
        return t in PRODUCT_REFUSALS
    except TypeError:
        return False


def oba_refusal(node, module, live_inputs: int):
    """Why the generic rule cannot stand in for fx ``node`` in an ``oba`` run (or ``None``): a
    message, or a :class:`~oba_ext.errors.RefusedError` for an op the reference path refuses
    too (so ``impl="kernel"`` raises the same class as the reference path).

    ``live_inputs``: how many of the node's inputs carry streams (θ-dependent values)."""
    kind = _safe_kind(node, module)
    name = (f"module {type(module).__name__} ({node.target})" if node.op == "call_module"
            else _target_name(node))
    if kind == "any":
        return None
    if kind == "one":
        if live_inputs <= 1:
            return None
        return (f"node {node.name!r}: {name} with {live_inputs} θ-dependent inputs multiplies "
                f"them (a product, SPEC §8) and has no engine rule; score with "
                f"impl='reference'")
    text = f"node {node.name!r}: {_refusal_text(name)}"
    return RefusedError(text) if _reference_refuses(node) else text


def random_refusal(node, module) -> Optional[str]:
    """Why the generic rule cannot run fx ``node`` at all: it draws random numbers."""
    if not _is_random(node, module):
        return None
    name = (f"module {type(module).__name__} ({node.target})" if node.op == "call_module"
            else _target_name(node))
    return (f"node {node.name!r}: {name} draws random numbers and has no engine rule (the "
            f"generic rule would draw again for each stream); call model.eval() or use "
            f"impl='reference'")


_BAG_ARGS = ("input", "weight", "offsets", "max_norm", "norm_type", "scale_grad_by_freq")


def renorm_refusal(node, module) -> Optional[str]:
    """Why fx ``node`` cannot run at all: an embedding bag (``nn.EmbeddingBag`` or
    ``F.embedding_bag``) with ``max_norm`` renormalizes its weight in place at every forward, so
    scoring would modify the model and differentiate a different function; with
    ``scale_grad_by_freq=True`` torch's gradient is not the loss's derivative
    (:func:`oba_ext.reference.decompose.refuse_embedding_bag_flags`; ``nn.Embedding``/
    ``F.embedding`` have rules that refuse both, :mod:`.linear`)."""
    if node.op == "call_module" and isinstance(module, nn.EmbeddingBag):
        max_norm, freq, name = module.max_norm, module.scale_grad_by_freq, node.target
    elif node.op == "call_function" and node.target is F.embedding_bag:
        a = dict(zip(_BAG_ARGS, node.args))
        a.update(node.kwargs)
        max_norm, freq, name = a.get("max_norm"), a.get("scale_grad_by_freq", False), None
    else:
        return None
    from ...reference.decompose import refuse_embedding_bag_flags  # one wording, both paths
    try:
        refuse_embedding_bag_flags(name, max_norm, freq)
    except RefusedError as e:
        return RefusedError(f"node {node.name!r}: {e}")
    return None


def program_refusal(program, modules, quantities) -> Optional[str]:
    """The first reason (or ``None``) why a captured program cannot compute ``quantities``
    with its generic-rule steps: embedding bags that renormalize their weight in place
    (:func:`renorm_refusal`, any step) and random ops always, ops not known to be
    product-free when ``"oba"`` is asked for."""
    for st in program.steps:
        reason = renorm_refusal(st.node, st.module)
        if reason is not None:
            return reason
    live = {st.node: st.live for st in program.steps}
    tensor = {}
    for st in program.steps:
        ins = [st.flat[i] for i in st.node_pos] if st.flat is not None else []
        tensor[st.node] = _tensor_valued(st.node, [tensor.get(n, True) for n in ins])
        if st.rule is not GENERIC:
            continue
        tensor_ins = [n for n in ins if tensor.get(n, True)]
        if not tensor_ins:  # Python values only (torch.arange(x.shape[0])): evaluated as is
            continue
        reason = random_refusal(st.node, st.module)
        if reason is None and "oba" in quantities:
            n_live = sum(1 for n in tensor_ins if live.get(n, False))
            reason = oba_refusal(st.node, st.module, n_live)
        if reason is not None:
            return reason
    return None


_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout",
               "is_sparse", "is_quantized", "names"}
_META_METHODS = {"size", "dim", "numel", "item", "tolist", "stride", "element_size", "nelement",
                 "is_contiguous", "is_floating_point", "ndimension", "get_device"}
_PY_BUILTINS = {builtins.len, builtins.int, builtins.float, builtins.bool, builtins.isinstance}


def _tensor_valued(node, inputs_tensor) -> bool:
    """Whether fx ``node`` may hold a tensor (static, conservative: ``True`` when unsure).
    ``inputs_tensor``: the same for its node inputs."""
    if node.op in ("placeholder", "get_attr", "call_module"):
        return True
    if node.op == "call_method":
        return node.target not in _META_METHODS
    if node.op == "call_function":
        t = node.target
        if t is builtins.getattr:
            return not (len(node.args) > 1 and node.args[1] in _META_ATTRS)
        if t in _PY_BUILTINS:
            return False
        if getattr(t, "__module__", None) in ("_operator", "operator") and not any(inputs_tensor):
            return False  # arithmetic / indexing on Python values (x.shape[0] // 2)
    return True


def warn_once(call, mode_note: str):
    name = op_name(call).split(" (")[0]
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(f"oba_ext engine: no rule for {name}; using the generic torch.func rule "
                      f"(slower; {mode_note})", stacklevel=4)


def _has_own_rule(call) -> bool:
    """Whether the node has a registered rule (which then delegated to this one)."""
    from . import FUNCTION_RULES, METHOD_RULES, module_rule
    return _node_in(call.node, call.module, lambda m: module_rule(m) is not None, METHOD_RULES,
                    FUNCTION_RULES)


def _capture_error(msg):
    from ..capture import CaptureError
    return CaptureError(msg)


def _fill(cot, ref):
    """Cotangent structure like ``ref`` with ``None`` leaves replaced by zeros."""
    if isinstance(ref, torch.Tensor):
        return torch.zeros_like(ref) if cot is None else cot
    if isinstance(ref, (tuple, list)):
        cot = cot if cot is not None else [None] * len(ref)
        return type(ref)(_fill(c, r) for c, r in zip(cot, ref))
    return cot


class GenericRule:
    """``GenericRule(warn)``: the fallback (``warn=True``: checks the op against the allow-list
    and the random ops, warns once) or a registered rule's delegate (``warn=False``)."""

    def __init__(self, warn: bool = True):
        self.warn = warn

    def forward(self, call, ctx):
        fallback = self.warn and not _has_own_rule(call)
        ctx.oba_reason = None
        active = streamed_inputs(call)
        if fallback:
            reason = random_refusal(call.node, call.module)
            if reason is not None:
                raise _capture_error(reason)
            ctx.oba_reason = oba_refusal(call.node, call.module, len(active))
            warn_once(call, "exact for taylor and exact" + (
                "; an oba run refuses it" if ctx.oba_reason else
                ", and for oba: it holds no product of two θ-dependent values"))
        ctx.n_inputs = len(call.inputs)
        invoke = op_of(call, active)
        primals = tuple(call.inputs[i] for i in active)
        if not primals:  # nothing to differentiate
            ctx.primals = ()
            return invoke(), None
        # differentiate only the floating leaves of the output: masks and indices carry nothing
        y = invoke(*primals)
        leaves, spec = pytree.tree_flatten(y)
        float_pos = [k for k, v in enumerate(leaves) if is_float(v)]
        ctx.out_spec, ctx.out_leaves, ctx.float_pos = spec, len(leaves), float_pos
        if not float_pos:
            ctx.primals = ()
            return y, None

        def f(*xs):
            out = pytree.tree_flatten(invoke(*xs))[0]
            return tuple(out[k] for k in float_pos)

        tangents = [call.tangents[i] for i in active]
        ctx.f, ctx.active, ctx.primals = f, active, primals
        t_y = None
        ctx.tans = None
        if any(t is not None for t in tangents):
            tans = tuple(torch.zeros_like(p) if t is None else t for p, t in zip(primals, tangents))
            _, t_float = torch.func.jvp(f, primals, tans)
            ctx.tans = tans if ctx.want_exact else None
            t_leaves = [None] * len(leaves)
            for k, t in zip(float_pos, t_float):
                t_leaves[k] = t
            t_y = t_leaves[0] if isinstance(y, torch.Tensor) else pytree.tree_unflatten(t_leaves, spec)
        ctx.y_ref = tuple(leaves[k].detach() for k in float_pos)
        return y, t_y

    def _float_cots(self, ctx, v):
        """The cotangent (tensor, or nested lists for tuple outputs) at the floating leaves."""
        if ctx.out_leaves == 1 and ctx.float_pos == [0] and not isinstance(v, (list, tuple)):
            return (v,)
        if v is None:
            return tuple(None for _ in ctx.float_pos)
        leaves = _flatten_cot(v, ctx.out_spec)
        return tuple(leaves[k] for k in ctx.float_pos)

    def backward(self, ctx, g, c):
        # (a node the sweep evaluated without the rule — Python-valued inputs only — has none)
        primals = getattr(ctx, "primals", ())
        out = [None] * getattr(ctx, "n_inputs", 0)
        if not primals:
            return out
        if ctx.mode == "oba" and ctx.oba_reason is not None:
            raise _capture_error(ctx.oba_reason)
        f = ctx.f
        g = tuple(_fill(a, r) for a, r in zip(self._float_cots(ctx, g), ctx.y_ref))
        _, vjp_fn = torch.func.vjp(f, *primals)
        gs = vjp_fn(g)
        cs = None
        if c is not None:
            cf = self._float_cots(ctx, c)
            if any(x is not None for x in cf):
                cs = vjp_fn(tuple(_fill(a, r) for a, r in zip(cf, ctx.y_ref)))
        if ctx.exact and ctx.tans is not None:
            def gx_of(*xs):
                return torch.func.vjp(f, *xs)[1](g)
            # under the sweep's no_grad some backward formulas take a non-differentiable path
            # (torch.linalg.det's jvp-of-vjp came out wrong by 60%): differentiate with grad on
            with torch.enable_grad():
                _, extra = torch.func.jvp(gx_of, primals, ctx.tans)
            cs = extra if cs is None else tuple(a + b for a, b in zip(cs, extra))
        for k, i in enumerate(ctx.active):
            out[i] = (gs[k], cs[k] if cs is not None else None)
        return out


def _flatten_cot(v, spec):
    """Cotangent ``v`` (tensor / nested lists with ``None``) flattened like the output spec."""
    if spec.num_children == 0:
        return [v]
    kids = v if isinstance(v, (list, tuple)) else [None] * spec.num_children
    out = []
    for child, sub in zip(kids, spec.children()):
        out.extend(_flatten_cot(child, sub))
    return out


#: the shared instances the sweep uses
GENERIC = GenericRule(warn=True)
GENERIC_QUIET = GenericRule(warn=False)


#: ops whose value is a tuple of tensors (``x[i]`` cannot tell a tuple from a tensor)
_TUPLE_FUNCTIONS = {torch.chunk, torch.split, torch.unbind, torch.tensor_split, torch.sort,
                    torch.topk, torch.max, torch.min, torch.aminmax, torch.var_mean,
                    torch.std_mean, torch.kthvalue, torch.median, torch.cummax, torch.cummin}
_TUPLE_METHODS = {"chunk", "split", "unbind", "tensor_split", "sort", "topk", "max", "min",
                  "aminmax", "kthvalue", "median", "cummax", "cummin"}
_TUPLE_MODULES = (nn.LSTM, nn.GRU, nn.RNN, nn.LSTMCell, nn.MultiheadAttention)


def tuple_input_refusal(program) -> Optional[str]:
    """Why the sweep cannot run ``program``: a tuple-valued node passed *whole* to another op
    (``cell(x, state)`` with ``state = cell(...)``, ``torch.cat(x.chunk(2))``). The sweep
    carries streams per tensor argument, so the tuple's elements would silently carry none;
    unpack it (``h, c = state``) or score with impl='reference'."""
    tuple_valued = set()
    for st in program.steps:
        n = st.node
        if n.op == "call_function" and n.target in _TUPLE_FUNCTIONS and not (
                n.target in (torch.max, torch.min, torch.median) and len(n.args) < 2
                and "dim" not in n.kwargs):
            tuple_valued.add(n)
        elif n.op == "call_method" and n.target in _TUPLE_METHODS and not (
                n.target in ("max", "min", "median") and len(n.args) < 2
                and "dim" not in n.kwargs):
            tuple_valued.add(n)
        elif n.op == "call_module" and isinstance(st.module, _TUPLE_MODULES):
            tuple_valued.add(n)
    for st in program.steps:
        if st.flat is None or st.tuple_getitem or not st.live:
            continue
        for i in st.node_pos:
            src = st.flat[i]
            if src in tuple_valued:
                return (f"node {st.node.name!r} takes the tuple {src.name!r} whole as an "
                        f"argument; the engine carries streams per tensor argument — unpack it "
                        f"first (e.g. `h, c = state`, `a, b = x.chunk(2)`), or use "
                        f"impl='reference'")
    return None
