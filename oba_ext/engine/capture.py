"""Graph capture for the engine: ``torch.fx`` symbolic tracing, checked and compiled into steps.

Why fx (and not torch.export): scores are keyed by qualified module names, and fx keeps a
``call_module`` node per leaf-module call with exactly that name (``layer1.0.conv1``); export
inlines modules into aten ops and only keeps names as metadata. fx also keeps the user-level
ops (``F.relu``, ``x.view``, ``operator.add``) that the rule registry is keyed by, needs no
example input, and does not specialize shapes, so one capture serves every batch size.
Cost: models with data-dependent Python control flow cannot be traced → ``CaptureError``.

Leaf modules: every module with a rule (Linear, Conv, BN, LN, GN, activations, pooling,
dropout, …), the modules in ``rules.UNSUPPORTED`` and fx's default leaves (torch.nn modules).

A :class:`Step` per node holds everything the sweep needs that does not depend on the data:
the rule, the flattened argument template, which leaves are nodes, the scored layer name,
whether the node is *live* (downstream of a target or scored norm layer, so it carries streams
and needs cotangents) and which earlier values can be freed after it.
"""
from __future__ import annotations

import functools
import inspect
import operator
import os
import re
import itertools
import traceback
from typing import Dict, List, Optional

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from . import rules as R
from .rules.function import FUNCTION_RULE, FunctionApply
from .rules.generic import GENERIC
from ..errors import RefusedError
from ..reference.functions import is_transparent

_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      torch.relu_, torch.nn.functional.relu_}


class CaptureError(Exception):
    """The model cannot be captured by the engine (the message says why). ``reason``: a message,
    or a :class:`~oba_ext.errors.RefusedError` when the cause is one every path refuses (then
    ``refused`` is True, and ``impl="kernel"`` raises a ``RefusedError``, like the reference
    path; otherwise a ``RuntimeError``)."""

    def __init__(self, reason, refused=None):
        super().__init__(str(reason))
        self.refused = isinstance(reason, RefusedError) if refused is None else bool(refused)


def _encoder_layer_forward(m, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
    """``nn.TransformerEncoderLayer.forward`` as fx can trace it: its slow path, the one
    autograd runs whenever a parameter requires grad (so the reference path computes this very
    function). Left out: the fast-path checks (Python branches on tensor attributes) and
    ``F._canonical_mask`` (dtype checks on the mask); the attention rule reads bool and
    additive masks itself."""
    x = src
    if m.norm_first:
        x = x + m._sa_block(m.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
        return x + m._ff_block(m.norm2(x))
    x = m.norm1(x + m._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
    return m.norm2(x + m._ff_block(x))


def _encoder_forward(m, src, mask=None, src_key_padding_mask=None, is_causal=None):
    """``nn.TransformerEncoder.forward`` without its fast path and nested-tensor conversion:
    the layers in turn, then the final norm. ``is_causal`` is only a hint to the layers; with
    a mask the attention rule uses the mask itself."""
    out = src
    for layer in m.layers:
        out = layer(out, src_mask=mask, is_causal=bool(is_causal),
                    src_key_padding_mask=src_key_padding_mask)
    return m.norm(out) if m.norm is not None else out


def _decoder_forward(m, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                     memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal=False):
    """``nn.TransformerDecoder.forward`` without its causal-mask detection (a comparison of
    the mask's values): the layers in turn, then the final norm (``tgt_is_causal`` is a hint;
    with a mask the attention rule uses the mask)."""
    out = tgt
    for layer in m.layers:
        out = layer(out, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                    tgt_key_padding_mask=tgt_key_padding_mask,
                    memory_key_padding_mask=memory_key_padding_mask,
                    tgt_is_causal=bool(tgt_is_causal), memory_is_causal=memory_is_causal)
    return m.norm(out) if m.norm is not None else out


def _transformer_forward(m, src, tgt, src_mask=None, tgt_mask=None, memory_mask=None,
                         src_key_padding_mask=None, tgt_key_padding_mask=None,
                         memory_key_padding_mask=None, src_is_causal=None, tgt_is_causal=None,
                         memory_is_causal=False):
    """``nn.Transformer.forward`` without its shape checks (Python comparisons of sizes):
    encoder, then decoder."""
    memory = m.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask,
                       is_causal=src_is_causal)
    return m.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                     tgt_key_padding_mask=tgt_key_padding_mask,
                     memory_key_padding_mask=memory_key_padding_mask,
                     tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)


#: forwards fx cannot trace (data-dependent fast-path checks, mask-value detection, size
#: checks) -> a traceable equivalent with the same signature, used for a module (submodule or
#: the root) whose class does not override them. nn.TransformerDecoderLayer needs none.
_TRACEABLE_FORWARDS = {nn.TransformerEncoderLayer.forward: _encoder_layer_forward,
                       nn.TransformerEncoder.forward: _encoder_forward,
                       nn.TransformerDecoder.forward: _decoder_forward,
                       nn.Transformer.forward: _transformer_forward}


class _Tracer(fx.Tracer):
    """Leaves: modules with a rule or listed as unsupported; other torch.nn modules only when
    they have no submodules (a torch.nn container such as nn.TransformerEncoderLayer is traced
    through, so the Linear layers inside it appear as target nodes).

    Research-code shapes handled here: a module created inside ``forward`` (not a submodule of
    the model, e.g. ``nn.AvgPool2d(2)(x)``) is traced through when it has no parameters or
    buffers of its own; a custom ``torch.autograd.Function`` call ``Fn.apply(...)`` on traced
    values becomes one node (target :class:`~.rules.function.FunctionApply`) instead of being
    traced into, so its own backward/jvp are used."""

    record_stack_traces = True  # node.meta["stack_trace"]: where a refused node is in the model

    def trace(self, root, concrete_args=None):
        from torch.autograd.function import Function
        orig = Function.__dict__["apply"]
        tracer = self

        def apply(cls, *args, **kwargs):
            if (not is_transparent(cls)
                    and any(isinstance(a, fx.Proxy) for a in pytree.tree_leaves((args, kwargs)))):
                return tracer.create_proxy("call_function", FunctionApply.of(cls), args, kwargs)
            return orig.__get__(None, cls)(*args, **kwargs)

        Function.apply = classmethod(apply)
        # a root whose forward needs a traceable equivalent: trace it through a subclass whose
        # forward is that equivalent (fx reads the class's forward), for the time of the trace
        cls = type(root)
        sub = _TRACEABLE_FORWARDS.get(cls.forward) if isinstance(root, nn.Module) else None
        if sub is not None:
            root.__class__ = type(cls.__name__, (cls,), {"forward": sub,
                                                         "__module__": cls.__module__})
        try:
            return super().trace(root, concrete_args)
        finally:
            Function.apply = orig
            if sub is not None:
                root.__class__ = cls

    def call_module(self, m, forward, args, kwargs):
        inner = getattr(m, "_orig_mod", None)
        if isinstance(inner, nn.Module) and type(m).__name__ == "OptimizedModule":
            # a torch.compile'd submodule: trace the module it wraps (names keep "_orig_mod")
            return self.call_module(inner, inner.forward, args, kwargs)
        try:
            self.path_of_module(m)
        except NameError:  # created inside forward: not a submodule of the model
            own = [n for n, _ in itertools.chain(m.named_parameters(), m.named_buffers())]
            if own:
                raise CaptureError(
                    f"a {type(m).__name__} module created inside forward (not a submodule of "
                    f"the model) has its own parameters/buffers {own[:3]}; make it a submodule "
                    f"(assign it in __init__)") from None
            return forward(*args, **kwargs)
        sub = _TRACEABLE_FORWARDS.get(type(m).forward)
        if sub is not None:
            forward = functools.partial(sub, m)
        return super().call_module(m, forward, args, kwargs)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if R.module_rule(m) is not None or any(c in R.UNSUPPORTED for c in type(m).__mro__):
            return True
        if next(m.children(), None) is not None:
            return False
        return super().is_leaf_module(m, qualname)


class Step:
    __slots__ = ("node", "op", "rule", "fn", "module", "flat", "spec", "node_pos", "live",
                 "layer", "free_after", "tuple_getitem", "needs_nodes")

    def __init__(self, node):
        self.node = node
        self.op = node.op
        self.rule = None
        self.fn = None
        self.module = None
        self.flat = None
        self.spec = None
        self.node_pos: List[int] = []
        self.live = False
        self.layer: Optional[str] = None
        self.free_after: List[fx.Node] = []
        self.tuple_getitem = False


class Program:
    """A captured model: ``steps`` in topological order, ``output`` node, ``placeholders``.
    A model returning a tuple/list/dict has ``output`` None and its flattened structure in
    ``output_leaves`` (nodes or constants) and ``output_spec`` (``torch.utils._pytree``)."""

    def __init__(self, steps, output, placeholders, defaults, output_leaves=None,
                 output_spec=None):
        self.steps = steps
        self.output = output
        self.placeholders = placeholders
        self.defaults = defaults
        self.output_leaves, self.output_spec = output_leaves, output_spec


def _fetch_attr(model, target: str):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _is_inplace(node, modules) -> bool:
    if node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__"):
        return True
    if node.op == "call_function" and node.target in _INPLACE_FUNCTIONS:
        return True
    if node.kwargs.get("inplace", False) is True:
        return True
    if node.op == "call_module" and getattr(modules[node.target], "inplace", False) is True:
        return True
    return False


_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_OBA_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OBA_MODELS = os.path.join(_OBA_DIR, "models")


def _user_frame(filename: str) -> bool:
    f = os.path.abspath(filename)
    if f.startswith(_OBA_MODELS + os.sep):
        return True
    return not (f.startswith(_TORCH_DIR + os.sep) or f.startswith(_OBA_DIR + os.sep)
                or f.startswith("<"))


def user_location(exc: BaseException) -> Optional[str]:
    """``file:line in func: code`` of the innermost frame of ``exc``'s traceback that is in the
    user's code (not torch, not oba_ext's machinery), or None."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if _user_frame(f.filename)]
    if not frames:
        return None
    f = frames[-1]
    code = f" `{f.line.strip()}`" if f.line else ""
    return f"{f.filename}:{f.lineno} in {f.name}{code}"


def _node_location(node) -> Optional[str]:
    """Where ``node`` came from in the user's model (fx's recorded stack trace)."""
    st = node.meta.get("stack_trace") if node is not None else None
    if not st:
        return None
    hits = [m for m in re.finditer(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', st)
            if _user_frame(m.group(1))]
    if not hits:
        return None
    m = hits[-1]
    return f"{m.group(1)}:{m.group(2)} in {m.group(3)} `{m.group(4).strip()}`"


def concrete_defaults(model: nn.Module, inputs) -> Dict[str, object]:
    """``forward`` parameters with a plain default (None, bool, int, float, str) that the batch
    ``inputs`` (a tensor, a tuple of positional tensors, or a dict of keyword tensors) does not
    pass: traced as the constant default (fx ``concrete_args``), so research code that branches
    on them (``if return_features:``) can be captured."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return {}
    if isinstance(inputs, dict):
        n_pos, names = 0, set(inputs)
    elif isinstance(inputs, (tuple, list)):
        n_pos, names = len(inputs), set()
    else:
        n_pos, names = 1, set()
    out = {}
    for j, p in enumerate(sig.parameters.values()):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            break
        passed = (j < n_pos and p.kind != p.KEYWORD_ONLY) or p.name in names
        if passed or p.default is p.empty:
            continue
        if p.default is None or type(p.default) in (bool, int, float, str):
            out[p.name] = p.default
    return out


def hook_refusal(model: nn.Module) -> Optional[str]:
    """Why the engine cannot run ``model`` because of module hooks or a per-instance
    ``forward`` (fx calls modules without their hooks, and the sweep computes its own
    backward): a reason naming the module, or None. ``torch.nn.utils.prune`` pre-hooks are
    allowed (a masked weight is scored at its effective value, :mod:`oba_ext.model_prep`)."""
    from torch.nn.modules import module as M
    from torch.nn.utils.prune import BasePruningMethod
    for kind, d in (("forward", M._global_forward_hooks),
                    ("forward pre-", M._global_forward_pre_hooks),
                    ("backward", M._global_backward_hooks),
                    ("backward pre-", getattr(M, "_global_backward_pre_hooks", {}))):
        if d:
            return (f"global module {kind}hooks are registered "
                    f"(torch.nn.modules.module.register_module_{kind.strip('- ')}_hook); the "
                    f"engine does not run hooks")
    for name, m in model.named_modules():
        label = f"module {name or '<root>'!r} ({type(m).__name__})"
        pre = [h for h in m._forward_pre_hooks.values() if not isinstance(h, BasePruningMethod)]
        hooks = list(m._forward_hooks.values()) + pre + list(m._backward_hooks.values()) + list(
            getattr(m, "_backward_pre_hooks", {}).values())
        if hooks:
            names = ", ".join(getattr(h, "__name__", type(h).__name__) for h in hooks)
            return f"{label} has hooks ({names}); the engine does not run module hooks"
        if "forward" in m.__dict__ and not hasattr(m, "_orig_mod"):  # torch.compile's wrapper
            # sets forward on the instance; the engine traces its _orig_mod (model_prep)
            return (f"{label}: its forward is replaced on the instance; the engine traces the "
                    f"class's forward")
    return None


class _grad_mode_recorder:
    """Records where a traced ``forward`` switches gradients off (fx drops grad-mode changes)."""

    def __enter__(self):
        import traceback
        self.calls: List[str] = []
        self._orig = torch._C._set_grad_enabled
        orig, calls = self._orig, self.calls

        def spy(mode):
            if not mode and not calls:
                frames = [f for f in traceback.extract_stack()[:-1]
                          if "/torch/" not in f.filename and "/oba_ext/" not in f.filename]
                calls.append(f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?")
            return orig(mode)
        torch._C._set_grad_enabled = spy
        return self.calls

    def __exit__(self, *exc):
        torch._C._set_grad_enabled = self._orig
        return False


def _random_states(model: nn.Module) -> Dict[str, object]:
    """The states of the random-number generators a forward may draw from outside traced
    tensor ops: torch's CPU (and initialized CUDA) generators, the model's own
    ``torch.Generator`` attributes, Python's ``random`` and, when imported, NumPy's."""
    import random
    import sys
    from ..reference.oracles import module_generators
    st = {"torch": torch.get_rng_state(), "Python's random": random.getstate()}
    if torch.cuda.is_initialized():
        st["torch.cuda"] = torch.cuda.get_rng_state_all()
    for i, g in enumerate(module_generators(model)):
        st[f"the model's torch.Generator #{i}"] = g.get_state()
    np = sys.modules.get("numpy")
    if np is not None:
        st["NumPy's random"] = np.random.get_state()
    return st


def _restore_random_states(model: nn.Module, st: Dict[str, object]) -> None:
    import random
    import sys
    from ..reference.oracles import module_generators
    torch.set_rng_state(st["torch"])
    random.setstate(st["Python's random"])
    if "torch.cuda" in st:
        torch.cuda.set_rng_state_all(st["torch.cuda"])
    for i, g in enumerate(module_generators(model)):
        g.set_state(st[f"the model's torch.Generator #{i}"])
    if "NumPy's random" in st:
        sys.modules["numpy"].random.set_state(st["NumPy's random"])


def _random_states_changed(before: Dict[str, object], after: Dict[str, object]) -> str:
    """The names of the generators whose state differs (comma-separated), or ''."""
    def same(a, b):
        if isinstance(a, torch.Tensor):
            return torch.equal(a, b)
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if hasattr(a, "shape") and hasattr(a, "dtype"):  # numpy arrays
            return bool((a == b).all())
        return a == b
    return ", ".join(k for k in before if k in after and not same(before[k], after[k]))


def capture(model: nn.Module, layers: Dict[str, "LayerSpec"], example=None) -> Program:  # noqa: F821
    """Trace ``model`` and compile its graph into :class:`Step` s; ``CaptureError`` if not possible.

    example: ``(inputs, targets)`` of a batch, or None: ``forward`` parameters with a constant
        default that ``inputs`` does not pass are traced as constants (:func:`concrete_defaults`).
    A ``CaptureError`` names, where it can, the line of the user's model that stopped capture.
    """
    R._load()
    reason = hook_refusal(model)
    if reason is not None:
        raise CaptureError(reason)
    concrete = concrete_defaults(model, example[0]) if example is not None else {}
    rng_before = _random_states(model)
    try:
        with _grad_mode_recorder() as grad_off:
            graph = _Tracer().trace(model, concrete_args=concrete or None)
    except Exception as e:  # fx raises many types (TraceError, TypeError, …) for untraceable code
        if _random_states_changed(rng_before, _random_states(model)):
            _restore_random_states(model, rng_before)  # the fallback path must draw the same
        loc = user_location(e)
        raise CaptureError(f"torch.fx symbolic tracing of {type(model).__name__} failed"
                           + (f" at {loc}" if loc else "") + f": {type(e).__name__}: {e}") from e
    drew = _random_states_changed(rng_before, _random_states(model))
    if drew:  # put every generator back: the fallback path must draw what it would have
        _restore_random_states(model, rng_before)
        raise CaptureError(f"{type(model).__name__}.forward draws random numbers from {drew} "
                           f"while it is traced (Python's random, NumPy, or a torch random op "
                           f"with constant arguments such as torch.randperm(8)): the draw would "
                           f"be frozen into the captured program and every batch would reuse it")
    if grad_off:
        raise CaptureError(f"{type(model).__name__}.forward switches gradients off "
                           f"(torch.no_grad / set_grad_enabled(False)) at "
                           f"{grad_off[0]}: fx does not record grad mode, so the engine would "
                           f"differentiate through that stop-gradient")
    try:
        program = _compile(model, layers, graph)
    except CaptureError as e:
        node = getattr(e, "node", None)
        loc = _node_location(node)
        if loc and loc not in str(e):
            raise CaptureError(f"{e} (at {loc})", refused=e.refused) from e
        raise
    if program.output_spec is not None:
        program.output_spec = _real_output_spec(model, example, program)
    return program


def _real_output_spec(model: nn.Module, example, program) -> "pytree.TreeSpec":
    """The pytree spec of what the model really returns, for a structured output. fx records a
    dict subclass (a Hugging Face ``ModelOutput``) as a plain dict and loses its class; one
    eager call on the example batch (no gradients; buffers and every random generator put
    back) gives the real structure, so the loss sees the same object type on the engine as on
    the reference path (``isinstance``, attribute access, fields left None). ``CaptureError``
    when there is no example or the real leaves do not match the traced ones one to one."""
    if example is None:
        raise CaptureError(f"{type(model).__name__} returns a structure; the engine needs an "
                           f"example batch to learn its real type")
    from ..inputs import call_args
    args, kwargs = call_args(example[0])
    bufs = {n: b.clone() for n, b in model.named_buffers()}
    rng = _random_states(model)
    try:
        with torch.no_grad():
            real = model(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the reference path will raise it again, by name
        raise CaptureError(f"the example call of {type(model).__name__} failed "
                           f"({type(e).__name__}: {e})") from e
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in bufs:
                    b.copy_(bufs[n])
        _restore_random_states(model, rng)
    leaves, spec = pytree.tree_flatten(real)
    traced = program.output_leaves
    same = len(leaves) == len(traced) and all(
        isinstance(a, torch.Tensor) == isinstance(b, fx.Node) for a, b in zip(leaves, traced))
    if not same:
        raise CaptureError(f"the traced output of {type(model).__name__} does not match what it "
                           f"returns ({type(real).__name__} with {len(leaves)} leaves)")
    return spec


def _compile(model, layers, graph) -> Program:
    modules = dict(model.named_modules())
    target_params: Dict[int, str] = {}
    for s in layers.values():
        for p in (s.params if s.kind != "norm" else ()):
            q = s.qualified(p)
            other = target_params.setdefault(id(s.param(p)), q)
            if other != q:  # e.g. an Embedding tied to the output Linear
                raise CaptureError(f"module {s.name!r} ({type(s.module).__name__}) uses target "
                                   f"parameter {q!r}, which is also {other!r} (shared/tied "
                                   f"weights: the engine scores each target parameter once)")
    # scored norm layers (criteria with norm_layers=True): a module call records its channels;
    # a traced-through module (timm's BatchNormAct2d) must reach a functional norm rule
    norm_params = {id(s.param(p)): s.name for s in layers.values() if s.kind == "norm"
                   for p in s.params}
    norm_attr: Dict[fx.Node, str] = {}
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    steps: List[Step] = []
    placeholders, defaults, output = [], [], None
    live: Dict[fx.Node, bool] = {}
    called_layers = set()
    node = None
    try:
        for node in nodes:
            st = Step(node)
            if node.op == "placeholder":
                placeholders.append(node)
                defaults.append(node.args[0] if node.args else inspect_empty)
                live[node] = False
            elif node.op == "get_attr":
                val = _fetch_attr(model, node.target)
                if id(val) in target_params:
                    raise CaptureError(f"target parameter {target_params[id(val)]!r} is used outside "
                                       f"its module's forward (node {node.name!r}); the engine needs "
                                       f"target layers called as modules")
                if id(val) in norm_params:
                    norm_attr[node] = norm_params[id(val)]
                live[node] = False
            elif node.op == "output":
                output = node.args[0]
                if not isinstance(output, fx.Node):  # a tuple/list/dict of values
                    out_leaves, out_spec = pytree.tree_flatten(output)
                    if not any(isinstance(x, fx.Node) for x in out_leaves):
                        raise CaptureError(f"{type(model).__name__} returns "
                                           f"{type(output).__name__} holding no computed value")
                continue
            else:
                reason = R.unsupported_reason(node, modules)
                if reason is not None:
                    raise CaptureError(f"node {node.name!r}: {reason}")
                if node.op == "call_module":
                    st.module = modules[node.target]
                    st.fn = st.module
                    if node.target in layers:
                        st.layer = node.target
                        called_layers.add(node.target)
                        if layers[node.target].kind != "norm":
                            pm = getattr(st.module, "padding_mode", "zeros")
                            if pm != "zeros":
                                raise CaptureError(f"{node.target}: padding_mode={pm!r} is not "
                                                   f"supported by the engine (only 'zeros')")
                elif node.op == "call_function":
                    st.fn = node.target
                else:
                    st.fn = getattr(torch.Tensor, node.target, None)
                    if st.fn is None:
                        raise CaptureError(f"node {node.name!r}: unknown tensor method "
                                           f".{node.target}()")
                st.rule = R.lookup(node, modules)
                check = getattr(st.rule, "capture_check", None)
                reason = check(node, st.module) if check is not None else None
                if reason is not None:
                    raise CaptureError(reason)
                if node.op == "call_module" and st.layer is None:
                    for pname, prm in st.module.named_parameters():
                        if id(prm) in norm_params:
                            raise CaptureError(
                                f"module {node.target!r} ({type(st.module).__name__}) uses the "
                                f"parameters of scored norm layer {norm_params[id(prm)]!r}; the engine "
                                f"cannot record that layer's channel scores")
                        if id(prm) in target_params:
                            raise CaptureError(
                                f"module {node.target!r} ({type(st.module).__name__}) uses target "
                                f"parameter {target_params[id(prm)]!r} (as {pname!r}) outside the "
                                f"target layer's own call (shared/tied weights or a target inside "
                                f"a leaf module without a rule)")
                st.flat, st.spec = pytree.tree_flatten((tuple(node.args), dict(node.kwargs)))
                st.node_pos = [i for i, a in enumerate(st.flat) if isinstance(a, fx.Node)]
                norms = {norm_attr[st.flat[i]] for i in st.node_pos if st.flat[i] in norm_attr}
                if norms:
                    name = next(iter(norms))
                    if len(norms) > 1 or not getattr(st.rule, "records_norm", False) or name in called_layers:
                        raise CaptureError(
                            f"node {node.name!r} ({getattr(st.fn, '__name__', st.fn)}) uses the "
                            f"parameters of scored norm layer(s) {sorted(norms)} in a way the engine "
                            f"cannot record as that layer's channel scores")
                    st.layer = name
                    called_layers.add(name)
                st.tuple_getitem = (node.op == "call_function" and node.target is operator.getitem)
                inputs_live = any(live.get(st.flat[i], False) for i in st.node_pos)
                st.live = inputs_live or st.layer is not None
                live[node] = st.live
                if st.live and _is_inplace(node, modules) and st.node_pos:
                    mutated = st.flat[st.node_pos[0]]
                    later = [u for u in mutated.users if order[u] > order[node]]
                    if later:
                        raise CaptureError(f"node {node.name!r} mutates {mutated.name!r} in place, "
                                           f"which {later[0].name!r} reads afterwards; the engine "
                                           f"computes out of place (rewrite without in-place ops)")
                if st.live and isinstance(st.fn, FunctionApply) and st.rule is None:
                    st.rule = FUNCTION_RULE  # the Function's own backward/jvp (SPEC §8)
                if st.live and st.rule is None:
                    st.rule = GENERIC
            steps.append(st)
    except CaptureError as e:
        e.node = node  # for the location of the refusal in the user's model
        raise
    if output is None:
        raise CaptureError("the traced graph has no output")
    structured = not isinstance(output, fx.Node)
    out_nodes = {x for x in out_leaves if isinstance(x, fx.Node)} if structured else {output}
    if not any(live.get(n, False) for n in out_nodes):
        raise CaptureError("the model output does not depend on any target layer")
    # free each value after its last forward reader
    last = {}
    for st in steps:
        for i in st.node_pos:
            last[st.flat[i]] = st
    for n, st in last.items():
        if n not in out_nodes:
            st.free_after.append(n)
    if structured:
        return Program(steps, None, placeholders, defaults, out_leaves, out_spec)
    return Program(steps, output, placeholders, defaults)


class _Empty:
    def __repr__(self):
        return "<no default>"


inspect_empty = _Empty()
