"""How well a criterion's channel scores predict the true removal ΔL, and how results are shown.

Comparison rule (decided here, documented in benchmarks/README.md):

- criteria that *predict ΔL itself* are compared signed: ``taylor`` predicts ΔL ≈ −θ·g, so
  its prediction is ``−score``; ``delta_exact`` (−θ·g + ½θ·Hθ) and ``delta_oba``
  (−θ·g + ½θ·Ĥθ) are predictions as they are (:data:`DELTA_PREDICTORS`), and so is the
  analysis baseline ``taylor2_channel`` (−θ_c·g_c + ½θ_cᵀH_ccθ_c, the channel's own block);
- every other criterion is an *importance* (oba, exact, jacobian, fisher, magnitude, random,
  ...): its prediction is ``|score|``, which is also what pruning ranks by.

Headline number: Spearman ρ between the true ΔL and the prediction over all output channels of
all scored layers (``rho_global``); also the mean of per-layer ρ (``rho_layer_mean``: ranking
inside a layer, insensitive to per-layer scale) and ρ(|ΔL|, |score|) for every criterion
(``rho_abs``: "does it find the channels whose removal matters either way").
"""
from __future__ import annotations

import math
import os
from typing import Callable, Dict, List, Mapping, Sequence

import torch

#: the fidelity-only single-channel second-order Taylor predictor (fidelity_oracle.channel_taylor2)
TAYLOR2 = "taylor2_channel"

#: criterion -> map from its (signed) score to its predicted ΔL
DELTA_PREDICTORS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "taylor": lambda s: -s,
    "delta_exact": lambda s: s,
    "delta_oba": lambda s: s,
    TAYLOR2: lambda s: s,
}


def prediction(criterion: str, scores: torch.Tensor) -> torch.Tensor:
    """The value compared with the true ΔL: signed ΔL prediction, else |score|."""
    f = DELTA_PREDICTORS.get(criterion)
    return f(scores) if f is not None else scores.abs()


def compared_as(criterion: str) -> str:
    return "signed ΔL prediction" if criterion in DELTA_PREDICTORS else "|score|"


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    from scipy.stats import spearmanr
    a, b = a.double().flatten().numpy(), b.double().flatten().numpy()
    if a.size < 3 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def correlations(criterion: str, scores: Mapping[str, torch.Tensor],
                 delta: Mapping[str, torch.Tensor]) -> Dict[str, float]:
    """rho_global, rho_layer_mean, rho_abs for one criterion (layers = keys of ``delta``)."""
    names = list(delta)
    pred = {n: prediction(criterion, scores[n].double().cpu()) for n in names}
    d_all = torch.cat([delta[n] for n in names])
    p_all = torch.cat([pred[n] for n in names])
    s_all = torch.cat([scores[n].double().cpu().abs() for n in names])
    per_layer = [spearman(delta[n], pred[n]) for n in names]
    per_layer = [r for r in per_layer if not math.isnan(r)]
    return {"rho_global": spearman(d_all, p_all),
            "rho_layer_mean": sum(per_layer) / len(per_layer) if per_layer else float("nan"),
            "rho_abs": spearman(d_all.abs(), s_all)}


def markdown_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str],
                   headers: Sequence[str] = None) -> str:
    headers = headers or columns
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            cells.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _linthresh(v) -> float:
    """symlog's linear range: the 10th percentile of the nonzero magnitudes."""
    import numpy as np
    a = np.abs(np.asarray(v, dtype=float))
    a = a[a > 0]
    return float(np.percentile(a, 10)) if a.size else 1.0


def plot_scatter(model: str, delta: Mapping[str, torch.Tensor], scores: Mapping[str, Mapping[str, torch.Tensor]],
                 rho: Mapping[str, float], path: str) -> str:
    """A grid of scatter plots: true ΔL (x, symlog) vs each criterion's prediction (y)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    crits = list(scores)
    ncol = 4
    nrow = max(1, math.ceil(len(crits) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.3 * ncol, 3.0 * nrow), squeeze=False)
    d = torch.cat([delta[n] for n in delta]).numpy()
    for ax, c in zip(axes.flat, crits):
        p = torch.cat([prediction(c, scores[c][n].double().cpu()) for n in delta]).numpy()
        ax.scatter(d, p, s=5, alpha=0.6)
        ax.set_xscale("symlog", linthresh=_linthresh(d))
        ax.set_yscale("symlog", linthresh=_linthresh(p))
        ax.set_title(f"{c}  ρ={rho.get(c, float('nan')):.2f}", fontsize=9)
        ax.set_xlabel("true ΔL", fontsize=8)
        ax.set_ylabel(compared_as(c), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(crits):]:
        ax.axis("off")
    fig.suptitle(f"{model}: true removal ΔL vs criterion (one dot per output channel)", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(model: str, curves: Mapping[str, Mapping[str, List[tuple]]], path: str) -> str:
    """Held-out accuracy vs fraction of channels removed; one panel per mode, a line per criterion."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    modes = list(curves)
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for i, (crit, pts) in enumerate(curves[mode].items()):
            r, acc = [p[0] for p in pts], [p[1] for p in pts]
            # more criteria than default colours: the second round of colours gets dotted lines
            style = ({"color": "k", "ls": "--", "lw": 2} if crit.startswith("oracle")
                     else {"ls": ("-", ":", "-.")[(i // 10) % 3]})
            ax.plot(r, acc, marker=".", label=crit, **style)
        ax.set_title(f"{model}: one-shot, {mode.replace('_', '-')} ranking, no fine-tuning", fontsize=9)
        ax.set_xlabel("fraction of prunable output channels removed")
        ax.set_ylabel("held-out top-1 accuracy")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
