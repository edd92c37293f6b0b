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


def build_scorer(model, layers, loss_fn, example=None, quantities=None) -> EngineScorer:
    """Capture ``model`` once and return its batch scorer (``impl = "kernel"``).

    layers: ``{name: LayerSpec}`` from :func:`oba_ext.targets.find_layers`.
    loss_fn: ``loss_fn(outputs, targets) -> scalar`` (mean over the batch).
    example: ``(inputs, targets)`` of the first batch, or None: fx capture needs no example
        values; it only reads which ``forward`` arguments the batches pass (defaulted ones they
        do not pass are traced as constants).
    quantities: the base quantities the scorer will be asked for (``"taylor"``, ``"oba"``,
        ``"exact"``), or ``None`` (unknown: ops the generic rule cannot do in ``oba`` mode are
        then refused only when an ``oba`` batch reaches them).
    Raises :class:`CaptureError` when the model cannot be captured (also: a tuple-valued node
    passed whole to another op, whose elements would carry no streams), or when it holds an op
    without a rule that the generic rule cannot compute for ``quantities`` (one that draws
    random numbers; for ``oba``, one not known to be free of products of two θ-dependent
    values, SPEC §8) — the message names the node and the op.
    """
    program = capture(model, layers, example)
    from .rules.generic import program_refusal, tuple_input_refusal
    reason = (tuple_input_refusal(program)
              or program_refusal(program, dict(model.named_modules()), tuple(quantities or ())))
    if reason is not None:
        raise CaptureError(reason)
    return EngineScorer(model, layers, loss_fn, program)


__all__ = ["build_scorer", "CaptureError", "EngineScorer"]
