"""Pure-PyTorch reference implementations: same-named twins of every kernel op, and the
whole-model oracles of SPEC §7 behind :class:`ReferenceScorer` (``impl="reference"``)."""
from __future__ import annotations

import importlib
from typing import Dict, Iterable, Sequence

from torch import Tensor, nn

from .quantities import QUANTITIES, BatchContext, register_quantity
from .structured import reduce_layer

# optional quantity modules (baseline criteria); each registers itself on import
for _mod in ("baselines", "fastoba"):
    try:
        importlib.import_module(f"{__name__}.{_mod}")
    except ModuleNotFoundError as _e:
        if _e.name != f"{__name__}.{_mod}":
            raise


def refuse_reparametrized(layers) -> None:
    """The reference path moves θ by substituting the target parameters (``functional_call``);
    a weight recomputed from other tensors at every forward (``torch.nn.utils.parametrize``:
    ``parametrizations.weight_norm`` / ``spectral_norm``; the old hook-based ``weight_norm`` /
    ``spectral_norm``) would overwrite the substitution and every score would silently be 0.
    Raises ``ValueError`` naming the layer (``torch.nn.utils.prune`` masks are handled by
    scoring the effective weight, :mod:`oba_ext.model_prep`)."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.prune import BasePruningMethod
    for name, spec in layers.items():
        m = spec.module
        if parametrize.is_parametrized(m):
            which = sorted(m.parametrizations.keys())
            raise ValueError(f"layer {name!r} ({type(m).__name__}): {which} are reparametrized "
                             f"(torch.nn.utils.parametrize, e.g. weight_norm/spectral_norm); the "
                             f"reference path cannot move such a weight. Use impl='kernel', or "
                             f"remove the parametrization (parametrize.remove_parametrizations)")
        hooks = [h for h in m._forward_pre_hooks.values() if not isinstance(h, BasePruningMethod)]
        if hooks:
            raise ValueError(f"layer {name!r} ({type(m).__name__}) has forward pre-hooks "
                             f"({', '.join(type(h).__name__ for h in hooks)}), e.g. the old "
                             f"weight_norm/spectral_norm, that may recompute its weight and would "
                             f"override the reference path's substituted θ; remove them "
                             f"(torch.nn.utils.remove_weight_norm) before scoring")


def refuse_self_modifying(model) -> None:
    """Embeddings no path scores, refused before anything runs: ``nn.Embedding(max_norm=…)``
    renormalizes the looked-up rows of its weight in place during every forward (outside
    autograd): scoring would change the model, and the loss is not the function of θ that
    autograd differentiates; ``nn.Embedding(scale_grad_by_freq=True)`` makes torch scale the
    weight's gradient by the inverse index frequency, which is not the derivative of the loss.
    ``nn.EmbeddingBag`` with either argument is refused likewise.
    Raises ``ValueError`` naming the module and the argument, on every path (the engine refuses
    them at capture; functional ``F.embedding`` calls with them are refused when the reference
    path runs the model, :func:`.decompose.embedding_lookup`)."""
    from .decompose import refuse_embedding_bag_flags, refuse_embedding_flags
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding):
            refuse_embedding_flags(name, m.max_norm, m.scale_grad_by_freq)
        if isinstance(m, nn.EmbeddingBag):
            refuse_embedding_bag_flags(name, m.max_norm, m.scale_grad_by_freq)


class ReferenceScorer:
    """Batch scorer (protocol of :mod:`oba_ext.scoring`) on the exact autograd oracles."""

    impl = "reference"

    def __init__(self, model, layers, loss_fn):
        refuse_reparametrized(layers)
        refuse_self_modifying(model)
        self.model, self.layers, self.loss_fn = model, layers, loss_fn
        self.include_norm = any(s.kind == "norm" for s in layers.values())

    def __call__(self, inputs, targets, quantities: Sequence[str], keys: Iterable[str]):
        ctx = BatchContext(self.model, self.layers, inputs, targets, self.loss_fn,
                           include_norm=self.include_norm)
        keys = tuple(keys)
        res: Dict[str, Dict[str, Dict[str, Tensor]]] = {name: {} for name in self.layers}
        for q in quantities:
            fn = QUANTITIES.get(q)
            if fn is None:
                raise ValueError(f"reference path: unknown quantity {q!r}; known: {sorted(QUANTITIES)}")
            per_param = fn(ctx)
            for name, spec in self.layers.items():
                local = {p: per_param[spec.qualified(p)] for p in spec.params
                         if spec.qualified(p) in per_param}
                if local:
                    res[name][q] = reduce_layer(spec, local, keys)
        return {n: d for n, d in res.items() if d}


__all__ = ["ReferenceScorer", "BatchContext", "QUANTITIES", "register_quantity"]
