"""What :func:`oba_ext.score` does to a user's model before scoring it (SPEC §8).

- **Wrappers** (:func:`unwrap`): ``torch.compile``'d modules (``OptimizedModule``, whose
  original is ``_orig_mod``), ``nn.DataParallel`` and ``DistributedDataParallel`` (``.module``)
  are unwrapped, and the module inside is scored. Result names are the inner module's names
  (``"0"``, ``"features.3"``; not ``"module.0"`` or ``"_orig_mod.0"``); names passed in
  ``targets``/``ignore`` may use either form (:func:`strip_prefix`).
- **Masked weights** (:func:`effective_weights`): a ``torch.nn.utils.prune`` reparametrization
  (``weight = weight_orig ⊙ weight_mask``, recomputed by a forward pre-hook) is scored as the
  plain model whose weight is the effective weight: θ is ``weight_orig ⊙ weight_mask``, so masked
  entries score 0 and move by 0. While scoring, the pruning pre-hooks are lifted and ``weight`` is
  set to that product (detached), so the hook cannot overwrite a substituted weight (the
  reference path) or leave a stale one (the engine reads ``module.weight``); both are restored
  afterwards.
- **Devices under torch.distributed** (:func:`rank_device`): with NCCL each rank scores on
  ``cuda:LOCAL_RANK``.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import os
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import prune


def _wrapped(model: nn.Module) -> Optional[Tuple[nn.Module, str]]:
    """(inner module, attribute name) if ``model`` is a wrapper we unwrap, else None."""
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except Exception:  # pragma: no cover - torch without dynamo
        OptimizedModule = ()
    if OptimizedModule and isinstance(model, OptimizedModule):
        return model._orig_mod, "_orig_mod"
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module, "module"
    return None


def unwrap(model: nn.Module) -> Tuple[nn.Module, List[str]]:
    """The module inside any nesting of ``torch.compile`` / ``nn.DataParallel`` /
    ``DistributedDataParallel`` wrappers, and the attribute names walked (outermost first)."""
    path = []
    while True:
        w = _wrapped(model)
        if w is None:
            return model, path
        model, attr = w
        path.append(attr)


def strip_prefix(names, path: List[str]):
    """``targets``/``ignore`` entries named through the wrappers (``"module.0"``) -> inner names
    (``"0"``); other entries (inner names, module objects) are returned unchanged."""
    if names is None or not path:
        return names
    if isinstance(names, str):
        names = [names]
    prefix = ".".join(path)
    out = []
    for n in names:
        if isinstance(n, str) and n == prefix:
            n = ""
        elif isinstance(n, str) and n.startswith(prefix + "."):
            n = n[len(prefix) + 1:]
        out.append(n)
    return out


def _prune_hooks(model: nn.Module):
    """``(module, hook id, hook)`` for every ``torch.nn.utils.prune`` forward pre-hook."""
    out = []
    for mod in model.modules():
        for hid, hook in mod._forward_pre_hooks.items():
            if isinstance(hook, prune.BasePruningMethod):
                out.append((mod, hid, hook))
    return out


def has_masks(model: nn.Module) -> bool:
    return bool(_prune_hooks(model))


@contextlib.contextmanager
def detached_masked(model: nn.Module):
    """Masked weights set to detached ``weight_orig ⊙ weight_mask`` (so ``copy.deepcopy``
    works: it refuses the non-leaf tensor the pre-hook leaves), restored on exit. The hooks
    stay, so a copy made inside keeps its masks."""
    saved = []
    with torch.no_grad():
        for mod, _, hook in _prune_hooks(model):
            name = hook._tensor_name
            saved.append((mod, name, getattr(mod, name, None)))
            setattr(mod, name, hook.apply_mask(mod).detach())
    try:
        yield model
    finally:
        for mod, name, old in saved:
            setattr(mod, name, old)


def refresh_masked(model: nn.Module) -> nn.Module:
    """Set every masked tensor to detached ``orig ⊙ mask`` for good (for a private copy, after
    ``.to(dtype)`` converted ``weight_orig`` but not the plain ``weight`` attribute)."""
    with torch.no_grad():
        for mod, _, hook in _prune_hooks(model):
            setattr(mod, hook._tensor_name, hook.apply_mask(mod).detach())
    return model


@contextlib.contextmanager
def effective_weights(model: nn.Module):
    """Lift the pruning pre-hooks of ``model`` and set each masked tensor to its effective value
    ``orig ⊙ mask`` (detached); everything is restored on exit (hook order included)."""
    found = _prune_hooks(model)
    if not found:
        yield model
        return
    saved_hooks = {}
    saved_attrs = []
    with torch.no_grad():
        for mod, hid, hook in found:
            if id(mod) not in saved_hooks:
                saved_hooks[id(mod)] = (mod, dict(mod._forward_pre_hooks))
            name = hook._tensor_name
            saved_attrs.append((mod, name, getattr(mod, name, None)))
            setattr(mod, name, hook.apply_mask(mod).detach())
        for mod, hid, _ in found:
            del mod._forward_pre_hooks[hid]
    try:
        yield model
    finally:
        for mod, name, old in saved_attrs:
            setattr(mod, name, old)
        for mod, hooks in saved_hooks.values():
            mod._forward_pre_hooks.clear()
            mod._forward_pre_hooks.update(hooks)


def parameter_masks(layers) -> Dict[str, torch.Tensor]:
    """``{qualified target parameter name: its torch.nn.utils.prune mask}`` for the masked
    target parameters of ``layers`` ({name: LayerSpec}); empty for an unmasked model."""
    out: Dict[str, torch.Tensor] = {}
    for spec in layers.values():
        for p in spec.params:  # prune keeps <p>_orig and <p>_mask (also while its hook is lifted)
            mask = getattr(spec.module, p + "_mask", None)
            if isinstance(mask, torch.Tensor) and hasattr(spec.module, p + "_orig"):
                out[spec.qualified(p)] = mask
    return out


class MaskedDirections:
    """A curvature scorer (the direction protocol of :mod:`oba_ext.curvature`) for a model with
    masked target parameters: a masked entry is not a parameter that moves (θ = orig ⊙ mask,
    SPEC §8), so every direction is applied as ``v ⊙ mask`` and every product ``Mv`` is
    reported as ``(M (v ⊙ mask)) ⊙ mask``. Other attributes are the wrapped scorer's."""

    def __init__(self, scorer, masks: Dict[str, torch.Tensor]):
        self._scorer, self._masks = scorer, masks

    def __getattr__(self, name):
        return getattr(self._scorer, name)

    def _masked(self, v):
        if v is None:
            return None
        return {n: (t * self._masks[n].to(t) if n in self._masks else t) for n, t in v.items()}

    def __call__(self, inputs, targets, quantities, keys, direction=None):
        return self._scorer(inputs, targets, quantities, keys, direction=self._masked(direction))

    def hvp(self, inputs, targets, kind, direction):
        return self._masked(self._scorer.hvp(inputs, targets, kind, self._masked(direction)))


def _optimized_module_type():
    try:
        from torch._dynamo.eval_frame import OptimizedModule
        return OptimizedModule
    except Exception:  # pragma: no cover - torch without dynamo
        return None


def has_compiled_submodules(model: nn.Module) -> bool:
    opt = _optimized_module_type()
    return opt is not None and any(isinstance(m, opt) for m in model.modules())


@contextlib.contextmanager
def prepared(model: nn.Module):
    """Everything scoring needs around the batches: :func:`effective_weights`, and compiled
    submodules (``block = torch.compile(block)`` inside a model) run eagerly
    (``torch.compiler.set_stance("force_eager")``; the engine traces their ``_orig_mod``), so the
    derivatives are autograd's own (dynamo's aot_autograd has no double backward)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(effective_weights(model))
        if has_compiled_submodules(model) and hasattr(torch.compiler, "set_stance"):
            stack.enter_context(torch.compiler.set_stance("force_eager"))
        yield model


def rank_device(device, model_device: Optional[torch.device], backend: Optional[str],
                local_rank: Optional[int]) -> Optional[torch.device]:
    """The device a rank scores on. Under NCCL (one GPU per rank) a CUDA device without an index
    (``device="cuda"``), or a model on another GPU with ``device=None``, becomes
    ``cuda:LOCAL_RANK``; an explicit index is kept. Otherwise ``device`` (or the model's)."""
    dev = torch.device(device) if device is not None else model_device
    if backend != "nccl" or local_rank is None or dev is None or dev.type != "cuda":
        return dev
    if device is not None and torch.device(device).index is not None:
        return dev
    return torch.device("cuda", local_rank)


def copy_to(model: nn.Module, device: Optional[torch.device], dtype: Optional[torch.dtype]
            ) -> nn.Module:
    """``model`` itself when it already is on ``device`` in ``dtype`` (None: as it is), else a
    deep copy there (masked layers kept masked, the copy's effective weights refreshed); the
    user's model is never moved or cast."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    cur_dev = first.device if first is not None else None
    cur_dtype = next((p.dtype for p in model.parameters()), None)
    if (device is None or device == cur_dev) and (dtype is None or dtype == cur_dtype):
        return model
    with detached_masked(model):  # deepcopy refuses the prune hook's non-leaf weight
        return refresh_masked(copy.deepcopy(model).to(device=device, dtype=dtype))


def check_device_available(dev: Optional[torch.device], what: str) -> None:
    """``ValueError`` naming ``what`` when ``dev`` is a CUDA device this process cannot use (no
    CUDA, or an index beyond ``torch.cuda.device_count()``), instead of a driver error later.
    Touches CUDA only when ``dev`` is a CUDA device."""
    if dev is None or dev.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ValueError(f"{what}: {str(dev)!r} requested, but CUDA is not available here "
                         f"(torch.cuda.is_available() is False); score on 'cpu'")
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        raise ValueError(f"{what}: {str(dev)!r} requested, but this process sees {n} CUDA "
                         f"device(s) (cuda:0..cuda:{n - 1}; CUDA_VISIBLE_DEVICES may hide others)")


def check_initialized(model: nn.Module) -> None:
    """``ValueError`` naming the first lazy module (``nn.LazyLinear``, ``nn.LazyConv2d``, …)
    whose parameters are not materialized yet: there is no θ to score before one forward."""
    from torch.nn.modules.lazy import LazyModuleMixin
    for name, m in model.named_modules():
        if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():
            raise ValueError(f"model: module {name!r} ({type(m).__name__}) has uninitialized "
                             f"parameters; run one forward pass (model(x)) to materialize them "
                             f"before scoring")


def local_rank(group=None) -> Optional[int]:
    """``LOCAL_RANK`` from the environment (torchrun sets it), else the global rank modulo the
    number of visible GPUs, else None."""
    v = os.environ.get("LOCAL_RANK")
    if v is not None:
        return int(v)
    import torch.distributed as dist
    if dist.is_initialized() and torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return dist.get_rank(group) % torch.cuda.device_count()
    return None


__all__ = ["unwrap", "strip_prefix", "effective_weights", "detached_masked", "has_masks",
           "rank_device", "local_rank", "check_device_available",
           "check_initialized"]


def rng_state(generators=()):
    """The random state a forward may draw from: torch's CPU generator, the CUDA generators
    when CUDA is initialized, those of ``generators`` (``torch.Generator`` objects the model
    owns), Python's ``random`` and, when imported, NumPy's global generator. What must be put
    back for a forward to draw the same dropout masks and random values again."""
    import random
    import sys
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    np = sys.modules.get("numpy")
    return (torch.get_rng_state(), cuda, [g.get_state() for g in generators], random.getstate(),
            np.random.get_state() if np is not None else None)


def set_rng_state(state, generators=()) -> None:
    """Put back a :func:`rng_state` (``generators`` as given to it). CUDA states are set for
    the devices visible now (a checkpoint written with more GPUs visible sets the first ones)."""
    import random
    import sys
    cpu, cuda, own, py, npst = state
    torch.set_rng_state(cpu)
    if cuda is not None and torch.cuda.is_available():
        for i, st in enumerate(cuda[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(st, i)
    for g, st in zip(generators, own):
        g.set_state(st)
    random.setstate(py)
    np = sys.modules.get("numpy")
    if npst is not None and np is not None:
        np.random.set_state(npst)
