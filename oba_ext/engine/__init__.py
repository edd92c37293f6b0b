"""The fast engine (``impl="kernel"``): one two-stream forward sweep carrying ``(X, T)`` and
one two-stream backward sweep carrying ``(G, C)`` (SPEC §3), with target-layer scores computed
on the way back from what the sweeps hold (SPEC §5).

Layout: :mod:`.capture` (fx tracing → steps, ``CaptureError``), :mod:`.rules` (per-op rules
and their registry; the rule API is documented there), :mod:`.loss` (the loss node),
:mod:`.sweep` (the scorer), :mod:`.kernels` (the one place choosing compiled kernels or their
pure-PyTorch twins).

>>> scorer = build_scorer(model, find_layers(model), loss_fn, (inputs, targets))
>>> scorer(inputs, targets, ("oba",), ("out", "in"))["layer1.0.conv1"]["oba"]["out"]
"""
from __future__ import annotations

from .capture import CaptureError, capture
from .sweep import EngineScorer


def build_scorer(model, layers, loss_fn, example=None) -> EngineScorer:
    """Capture ``model`` once and return its batch scorer (``impl = "kernel"``).

    layers: ``{name: LayerSpec}`` from :func:`oba_ext.targets.find_layers`.
    loss_fn: ``loss_fn(outputs, targets) -> scalar`` (mean over the batch).
    example: ``(inputs, targets)`` of the first batch, or None: fx capture needs no example
        values; it only reads which ``forward`` arguments the batches pass (defaulted ones they
        do not pass are traced as constants).
    Raises :class:`CaptureError` when the model cannot be captured (the reason is in the message).
    """
    return EngineScorer(model, layers, loss_fn, capture(model, layers, example))


__all__ = ["build_scorer", "CaptureError", "EngineScorer"]
