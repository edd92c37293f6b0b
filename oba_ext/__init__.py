"""oba_ext: fast, exact neural-network pruning scores (Optimal Brain Apoptosis and friends).

>>> import oba_ext
>>> res = oba_ext.score(model, batches, kind="oba", granularity=("out", "in"))
>>> res["features.0"].out

Importing this package never touches CUDA and works even when the compiled extension
(``oba_ext._C``) is missing; ``python -m oba_ext.info`` says what was built.
"""
from .criteria import CRITERIA
from .errors import EmptyBatchError, RefusedError
from .results import LayerScores, ScoreResult
from .scoring import score
from .targets import LAYER_KINDS, find_layers

__version__ = "0.1.0"

#: curvature products (oba_ext/curvature.py), imported on first use (scipy stays unloaded)
_LAZY = {"hvp", "curvature_operator", "CurvatureOperator", "hutchinson_trace"}


def __getattr__(name):
    if name in _LAZY:
        from . import curvature
        return getattr(curvature, name)
    raise AttributeError(f"module 'oba_ext' has no attribute {name!r}")


__all__ = ["score", "ScoreResult", "LayerScores", "CRITERIA", "LAYER_KINDS", "find_layers",
           "hvp", "curvature_operator", "CurvatureOperator", "hutchinson_trace",
           "EmptyBatchError", "RefusedError", "__version__"]
