"""Turning scores into smaller models.

- :class:`OBAImportance`: a Torch-Pruning importance fed by :func:`oba_ext.score`.
- :func:`build_pruner`, :func:`prune_to_target`: structured pruning (MetaPruner) to a ratio or
  to a FLOPs / parameter target.
- :func:`unstructured_masks`, :func:`apply_masks`: per-weight masks at an exact sparsity.
"""
from .importance import OBAImportance
from .structured import (PruneOutcome, TargetUnreachableError, apply_fixups, build_pruner, count,
                         output_layers, prune_once, prune_to_target)
from .unstructured import apply_masks, prune_unstructured, sparsity_of, unstructured_masks

__all__ = ["OBAImportance", "PruneOutcome", "TargetUnreachableError", "apply_fixups", "build_pruner",
           "count", "output_layers", "prune_once", "prune_to_target", "apply_masks",
           "prune_unstructured", "sparsity_of", "unstructured_masks"]
