"""Run reports: JSON facts and PNG plots (matplotlib, Agg backend).

``channels_per_layer(model)``: {layer: channels} of every target layer, as its layer kind
counts them (``LayerKind.channels``: output channels; MHA embed dim; Embedding dimension).
``write_json``: atomic JSON write. ``plot_channels``: before/after bars per layer.
``plot_score_distributions``: histograms of log10 |score| per criterion.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Mapping

import torch
from torch import nn

from .layers import kind_of


def channels_per_layer(model: nn.Module) -> Dict[str, int]:
    out = {}
    for name, m in model.named_modules():
        kind = kind_of(m, include_norm=False)
        if kind is not None and any(isinstance(getattr(m, p, None), torch.Tensor)
                                    for p in kind.params):
            out[name] = kind.channels(m)
    return out


def write_json(obj, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=float)
    os.replace(tmp, path)


def _plt():
    # matplotlib is imported only when a plot is drawn (heavy; not needed to score or prune)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_channels(before: Mapping[str, int], after: Mapping[str, Mapping[str, int]], path: str,
                  title: str = "channels kept per layer") -> None:
    """Bars of channels per layer: the unpruned model and each pruned variant (``after``:
    {label: {layer: channels}})."""
    plt = _plt()
    names = list(before)
    width = 0.8 / (1 + len(after))
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names) + 2), 4))
    xs = range(len(names))
    ax.bar([x - 0.4 + width / 2 for x in xs], [before[n] for n in names], width, label="before")
    for i, (label, ch) in enumerate(after.items(), start=1):
        ax.bar([x - 0.4 + width * (i + 0.5) for x in xs], [ch.get(n, 0) for n in names], width,
               label=label)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("output channels")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_score_distributions(results: Mapping[str, object], path: str) -> None:
    """Histograms of log10 |out-channel score| over all layers, one per criterion
    (``results``: {label: ScoreResult})."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, res in results.items():
        vals = [ls.out.detach().abs().double().flatten() for ls in res.values() if ls.out is not None]
        if not vals:
            continue
        v = torch.cat(vals)
        v = torch.log10(v[v > 0])
        if v.numel():
            ax.hist(v.numpy(), bins=40, alpha=0.5, label=label)
    ax.set_xlabel("log10 |channel score|")
    ax.set_ylabel("channels")
    ax.set_title("score distributions (output channels)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
