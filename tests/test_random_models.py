"""Random tiny float64 models over the engine's op grammar (``tests/random_models.py``), each
checked against brute force / the oracle (issue 10, "prove the kind, not the example"):

- ``exact`` on the engine (``impl="kernel"``, per weight and bias) against ``θ ⊙ Hθ`` from the
  full Hessian of all target parameters (``torch.func.hessian``, ``tests/brute.py``);
- ``oba`` on the engine against the reference Φ-oracle (``impl="reference"``);
- ``taylor`` on the engine against the reference gradient.

Grammar (``tests/random_models.py``): Linear, Conv1d/2d (groups, stride), ConvTranspose2d,
Embedding (token-id inputs), BatchNorm2d (eval and train mode), GroupNorm, LayerNorm, six
activations (module and functional forms), residual adds, concat, products of activations
(two layers, or one layer split by chunk), squares, scalar arithmetic, SDPA (causal or not) and
explicit-matmul attention, nn.MultiheadAttention, max/avg/adaptive pooling, reshapes
(flatten, view/transpose, mean); cross-entropy or MSE loss.

The engine must capture every generated model (the grammar holds only ops it supports), so a
``CaptureError`` is a failure. A fixed seed list runs in ``make test``; a longer run:
``OBA_RANDOM_MODELS=200 pytest tests/test_random_models.py`` (seeds 0..199). A failure prints
the seed and the architecture; reproduce with ``random_models.generate(seed).describe()``.

Tolerance: FLOAT64_RTOL per tensor (SPEC §7), relative to the tensor's own norm; a tensor whose
right value is below 1e-9 of the model's score scale (the largest total norm of its exact,
oba and taylor scores) is mathematically zero up to rounding — a bias before a train-mode
BatchNorm, a key bias under softmax, every oba score of a model whose output does not depend
on its input (GroupNorm over one channel, then global pooling) — and is held to FLOAT64_RTOL of
that scale instead.
"""
from __future__ import annotations

import os

import pytest
import torch

import oba_ext
from brute import hessian_and_ggn_scores
from random_models import generate
from tolerances import FLOAT64_RTOL, ZERO_BY_STRUCTURE, rel_err

#: seeds run by ``make test``: 0-19 and the first seeds after them that bring in what 0-19 miss
#: (BatchNorm in train mode, SDPA causal/explicit-matmul attention, pooling, upsampling
#: ConvTranspose2d, scalar ops); test_generator_covers_the_grammar checks the coverage. Chosen
#: for coverage, not tuned to pass (OBA_RANDOM_MODELS=400 passes all seeds 0-399)
FIXED_SEEDS = list(range(20)) + [21, 23, 26, 31, 37, 43, 69, 78, 121]
#: seeds that expose known bugs: seed -> reason (xfail, strict)
KNOWN_BAD: dict = {}


def _seeds():
    n = os.environ.get("OBA_RANDOM_MODELS")
    seeds = list(range(int(n))) if n else FIXED_SEEDS
    return [pytest.param(s, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BAD[s]))
            if s in KNOWN_BAD else s for s in seeds]


def _check(got: dict, want: dict, scale: float, what: str, arch) -> None:
    bad = []
    for key, w in want.items():
        g = got[key]
        assert g.shape == w.shape, f"{what} {key}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        wn = torch.linalg.vector_norm(w).item()
        if wn > ZERO_BY_STRUCTURE * scale:
            err = rel_err(g, w)
        else:
            err = torch.linalg.vector_norm(g - w).item() / scale if scale > 0 else 0.0
        if not err <= FLOAT64_RTOL:
            bad.append(f"{key}: relative error {err:.3e}")
    assert not bad, f"{what} differs on {arch.describe()}\n  " + "\n  ".join(bad)


#: a scored layer's parameter -> where its per-weight score is in LayerScores
_FIELD = {"weight": "weight", "bias": "bias", "in_proj_weight": "weight", "in_proj_bias": "bias"}


def _per_param(res, layers):
    """{qualified parameter name: per-weight score} from a granularity="weight" result."""
    out = {}
    for name, spec in layers.items():
        for p in spec.params:
            v = getattr(res[name], _FIELD[p])
            assert v is not None, f"{name}: no {_FIELD[p]} score"
            out[spec.qualified(p)] = v
    return out


def _scale(d):
    return torch.linalg.vector_norm(torch.cat([v.reshape(-1) for v in d.values()])).item()


@pytest.mark.parametrize("seed", _seeds())
def test_random_model(seed):
    arch = generate(seed)
    model, x, y = arch.model, arch.inputs, arch.targets
    layers = oba_ext.find_layers(model)
    kw = dict(loss_fn=arch.loss, granularity="weight", progress=False)
    try:
        ex = oba_ext.score(model, [(x, y)], kind="exact", impl="kernel", **kw)
        ob = oba_ext.score(model, [(x, y)], kind="oba", impl="kernel", **kw)
        ta = oba_ext.score(model, [(x, y)], kind="taylor", impl="kernel", **kw)
    except Exception as e:
        raise AssertionError(f"engine failed on {arch.describe()}: {type(e).__name__}: {e}") from e
    ob_ref = oba_ext.score(model, [(x, y)], kind="oba", impl="reference", **kw)
    ta_ref = oba_ext.score(model, [(x, y)], kind="taylor", impl="reference", **kw)
    brute, _ = hessian_and_ggn_scores(model, x, y, loss=arch.loss, with_ggn=False)

    ob_want, ta_want = _per_param(ob_ref, layers), _per_param(ta_ref, layers)
    scale = max(_scale(brute), _scale(ob_want), _scale(ta_want))
    _check(_per_param(ex, layers), brute, scale, "exact (engine vs full Hessian)", arch)
    _check(_per_param(ob, layers), ob_want, scale, "oba (engine vs Φ-oracle)", arch)
    _check(_per_param(ta, layers), ta_want, scale, "taylor (engine vs reference)", arch)


def test_generator_covers_the_grammar():
    """The fixed seeds exercise every op of the grammar, every start and both losses."""
    from random_models import OPS, STARTS
    seen = " ".join(generate(s).describe() for s in FIXED_SEEDS)
    needles = {"dense": "Linear(", "conv": "Conv2d(", "act": "F.", "BN": "BatchNorm2d(",
               "GN": "GroupNorm(", "LN": "LayerNorm(", "residual": "x+[", "concat": "cat[",
               "product": ")*", "GLU": "[:C]", "square": "x*x", "sdpa": "sdpa",
               "causal": "causal", "matmul attention": "matmul", "mha": "MultiheadAttention",
               "maxpool": "MaxPool2d(2)", "avgpool": "AvgPool2d(2)", "to_seq": "transpose(1,2)",
               "conv1d": "Conv1d(", "strided": ",s2)", "scale": "0.5*x", "neg/div": "-x/2",
               "broadcast": "keepdim", "CE": "loss CE", "MSE": "loss MSE", "train": "train mode",
               "conv_transpose": "ConvTranspose2d(", "upsampling": "k2,s2)",
               "embedding": "Embedding("}
    missing = [k for k, n in needles.items() if n not in seen]
    assert not missing, f"fixed seeds miss {missing}; extend FIXED_SEEDS"
    assert {o.name for o in OPS} >= {"dense", "act", "norm", "residual", "concat", "product",
                                     "attention", "mha", "pool", "to_seq", "to_vec", "conv1d",
                                     "strided", "arith", "conv_transpose"}
    assert set(STARTS) >= {"img", "seq", "vec", "tokens"}
