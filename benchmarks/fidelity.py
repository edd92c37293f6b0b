"""Fidelity: do the criteria predict what removing a channel really does?

For each network (trained on real data, ``benchmarks/fidelity_models.py``):

1. the true ΔL of every output channel of every scored layer (remove it = zero its weight row
   and bias; held-out mean cross-entropy with it removed minus without), ``fidelity_oracle``;
2. every criterion registered in ``oba_ext.criteria.CRITERIA`` (picked up automatically;
   ``--criteria`` to choose) scored on the same held-out batches with
   ``oba_ext.score(..., granularity="out", impl=--impl, dtype=--score-dtype)``; a criterion that
   fails is skipped and the reason recorded;
3. Spearman ρ between true ΔL and each criterion (rule in ``fidelity_report``);
   For ``--taylor2-models`` also ``taylor2_channel`` (not a criterion: an analysis baseline),
   the single-channel second-order Taylor model f'(0) + ½f''(0) of removing that channel alone;
4. one-shot accuracy after removing the lowest-|score| channels (globally and per layer) at
   each ratio, without fine-tuning; the final classifier's outputs are not prunable. The
   ``oracle_true_dL`` curve ranks by the measured single-channel |ΔL| (the same |·| rule).

Writes under ``--out`` (default ``benchmarks/results``): ``fidelity_spearman.csv``,
``fidelity_pruning.csv``, ``fidelity_channels.csv`` (per channel: true ΔL and every score),
``fidelity_<model>_scatter.png``, ``fidelity_<model>_pruning.png`` and ``fidelity_<model>.md``
(markdown tables).

    python -m benchmarks.fidelity                       # both models, every criterion
    python -m benchmarks.fidelity --models digits_cnn --criteria oba taylor
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import time
import warnings
from typing import Dict, List, Mapping

import torch

import oba_ext
from oba_ext.targets import find_layers

from . import fidelity_oracle as oracle
from . import fidelity_report as report
from .fidelity_models import MODELS, build_trained, evaluate
from .harness import RESULTS_DIR, environment

DTYPES = {"float32": torch.float32, "float64": torch.float64}
ENV_COLS = ("timestamp", "git_sha", "device", "torch")


def _append(path: str, rows: List[Mapping[str, object]]) -> None:
    if not rows:
        return
    cols = list(rows[0])
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header != cols:
            raise SystemExit(f"{path}: has columns {header}, this run writes {cols}; move it away")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        if new:
            w.writeheader()
        w.writerows(rows)


def score_all(model, batches, criteria, impl: str, dtype, seed: int):
    """{criterion: {layer: out scores}}, {criterion: facts}, {criterion: skip reason}."""
    scores, facts, skipped = {}, {}, {}
    for c in criteria:
        torch.manual_seed(seed)  # "random" is seeded from torch.initial_seed()
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                res = oba_ext.score(model, batches, kind=c, granularity="out", impl=impl,
                                    dtype=dtype, progress=False)
        except Exception as e:  # noqa: BLE001 - recorded in the CSV and printed
            skipped[c] = f"{type(e).__name__}: {e}"
            print(f"  {c:<14} skipped: {skipped[c][:160]}")
            continue
        secs = time.perf_counter() - t0
        scores[c] = {n: res[n].out.detach().double().cpu() for n in res if res[n].out is not None}
        facts[c] = {"impl": res.impl, "score_seconds": secs,
                    "warnings": "; ".join(sorted({str(w.message)[:80] for w in caught}))}
        print(f"  {c:<14} impl={res.impl:<9} {secs:7.2f} s")
    return scores, facts, skipped


def run_model(name: str, args, env: Mapping[str, str], md: List[str]) -> None:
    print(f"== {name}")
    model, _, held, facts = build_trained(name, depth=args.depth, width=args.width,
                                          epochs=args.epochs, seed=args.seed, heldout=args.heldout)
    loss32, acc = evaluate(model, held)
    print(f"  trained in {facts['seconds']:.1f} s: held-out loss {loss32:.4f}, accuracy {acc:.4f}")
    layers = [n for n, s in find_layers(model).items() if s.kind in ("linear", "conv")]
    classifier = layers[-1]  # the output layer: its channels are classes, not prunable
    prunable = layers[:-1]

    dmodel = copy.deepcopy(model).to(DTYPES[args.delta_dtype])
    base, delta = oracle.true_delta_loss(dmodel, layers, held, progress=args.progress)
    # the evaluation noise floor: the same loss in float32 and in float64
    noise = abs(evaluate(copy.deepcopy(model).double(), held)[0] - loss32)
    del dmodel
    print(f"  true ΔL: {sum(d.numel() for d in delta.values())} channels, base loss {base:.6f} "
          f"({args.delta_dtype}; |L_f32 − L_f64| = {noise:.2e}; smallest |ΔL| "
          f"{min(d.abs().min().item() for d in delta.values()):.2e})")

    batches = held.batches(args.batch_size)
    criteria = [c for c in (args.criteria or sorted(oba_ext.CRITERIA)) if c not in args.exclude]
    scores, sfacts, skipped = score_all(model, batches, criteria, args.impl,
                                        DTYPES[args.score_dtype], args.seed)

    if name in args.taylor2_models:
        print("  single-channel second-order Taylor (f'(0) + ½f''(0), forward-over-forward AD) ...")
        t2 = oracle.channel_taylor2(copy.deepcopy(model).double(), layers, held, progress=args.progress)
        if "taylor" in scores:  # f'(0) is −taylor: a free cross-check of conventions and engine
            err = max((t2[n][0] + scores["taylor"][n]).abs().max().item() for n in layers)
            print(f"  max |f'(0) + taylor| = {err:.2e}")
        scores[report.TAYLOR2] = {n: t2[n][0] + 0.5 * t2[n][1] for n in layers}
        sfacts[report.TAYLOR2] = {"impl": "torch.func (fidelity only)", "score_seconds": float("nan"),
                                  "warnings": ""}
    rho_rows, chan_rows, prune_rows = [], [], []
    rho_map = {}
    for c, sc in scores.items():
        r = report.correlations(c, sc, delta)
        rho_map[c] = r["rho_global"]
        rho_rows.append({**{k: env[k] for k in ENV_COLS}, "model": name, "criterion": c,
                         "compared_as": report.compared_as(c), **{k: round(v, 4) for k, v in r.items()},
                         "n_channels": sum(d.numel() for d in delta.values()),
                         "impl": sfacts[c]["impl"], "score_seconds": round(sfacts[c]["score_seconds"], 3),
                         "heldout_accuracy": acc, "note": sfacts[c]["warnings"] or args.note})
    for c, why in skipped.items():
        rho_rows.append({**{k: env[k] for k in ENV_COLS}, "model": name, "criterion": c,
                         "compared_as": report.compared_as(c), "rho_global": "", "rho_layer_mean": "",
                         "rho_abs": "", "n_channels": 0, "impl": "", "score_seconds": "",
                         "heldout_accuracy": acc, "note": f"skipped: {why}"[:300]})
    for n in layers:
        for o in range(delta[n].numel()):
            row = {"model": name, "layer": n, "channel": o, "true_dL": f"{delta[n][o].item():.9g}"}
            row.update({c: f"{scores[c][n][o].item():.9g}" for c in scores})
            chan_rows.append(row)

    # pruning removes the lowest |score| (importances) or lowest |predicted ΔL| (ΔL predictors)
    ranks = {c: {n: report.prediction(c, sc[n]).abs() for n in prunable} for c, sc in scores.items()}
    ranks["oracle_true_dL"] = {n: delta[n].abs() for n in prunable}
    curves: Dict[str, Dict[str, list]] = {}
    for mode in ("global", "per_layer"):
        curves[mode] = {}
        for c, rv in ranks.items():
            pts = oracle.prune_curve(model, rv, held, args.ratios, mode)
            curves[mode][c] = pts
            prune_rows += [{**{k: env[k] for k in ENV_COLS}, "model": name, "criterion": c, "mode": mode,
                            "ratio": r, "accuracy": round(a, 4), "loss": round(l, 5), "note": args.note}
                           for r, a, l in pts]
    out = args.out
    os.makedirs(out, exist_ok=True)
    _append(os.path.join(out, "fidelity_spearman.csv"), rho_rows)
    _append(os.path.join(out, "fidelity_pruning.csv"), prune_rows)
    chan_path = os.path.join(out, f"fidelity_channels_{name}.csv")
    if os.path.exists(chan_path):
        os.remove(chan_path)  # per-channel data: the latest run only
    _append(chan_path, chan_rows)
    sp = report.plot_scatter(name, delta, scores, rho_map, os.path.join(out, f"fidelity_{name}_scatter.png"))
    pp = report.plot_curves(name, curves, os.path.join(out, f"fidelity_{name}_pruning.png"))

    n_ch = sum(d.numel() for d in delta.values())
    md.append(f"### {name}: {n_ch} output channels in {len(layers)} layers; held-out accuracy {acc:.3f} "
              f"(trained {facts['seconds']:.0f} s); true ΔL in {args.delta_dtype}, scores in "
              f"{args.score_dtype}\n")
    table = sorted((r for r in rho_rows if r["rho_global"] != ""), key=lambda r: -r["rho_global"])
    md.append(report.markdown_table(table, ["criterion", "compared_as", "rho_global", "rho_layer_mean",
                                            "rho_abs", "impl", "score_seconds"],
                                    ["criterion", "compared as", "ρ global", "ρ per-layer mean",
                                     "ρ(|ΔL|,|s|)", "impl", "score s"]))
    if skipped:
        md.append("\nSkipped: " + "; ".join(f"`{c}` ({w[:100]})" for c, w in skipped.items()))
    acc_rows = []
    for c in ranks:
        row = {"criterion": c}
        for mode in ("global", "per_layer"):
            for r, a, _ in curves[mode][c]:
                if any(abs(r - q) < 1e-9 for q in args.table_ratios):
                    row[f"{mode}@{r:g}"] = a
        acc_rows.append(row)
    cols = ["criterion"] + [f"{m}@{q:g}" for m in ("global", "per_layer") for q in args.table_ratios]
    n_prunable = sum(delta[n].numel() for n in prunable)
    md.append(f"\nOne-shot held-out accuracy after removing a fraction of the {n_prunable} prunable "
              f"channels (all but `{classifier}`; no fine-tuning; unpruned {acc:.3f}):\n")
    md.append(report.markdown_table(sorted(acc_rows, key=lambda r: -sum(v for k, v in r.items() if k != "criterion")),
                                    cols))
    md.append(f"\nPlots: `{os.path.relpath(sp)}`, `{os.path.relpath(pp)}`\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Fidelity of pruning criteria vs the true removal ΔL")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=sorted(MODELS))
    ap.add_argument("--criteria", nargs="+", default=None,
                    help="criterion names (default: every one in oba_ext.criteria.CRITERIA)")
    ap.add_argument("--exclude", nargs="*", default=[], help="criteria to leave out (e.g. slow ones)")
    ap.add_argument("--depth", type=int, default=8, help="resnet depth 6n+2 (8, 14, 20)")
    ap.add_argument("--width", type=int, default=8, help="resnet base width")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default per model)")
    ap.add_argument("--heldout", type=int, default=600, help="held-out images (of 1797 digits)")
    ap.add_argument("--batch-size", type=int, default=120, help="held-out batch size for scoring")
    ap.add_argument("--impl", default="auto", choices=["auto", "reference", "kernel"])
    ap.add_argument("--score-dtype", default="float64", choices=sorted(DTYPES))
    ap.add_argument("--delta-dtype", default="float64", choices=sorted(DTYPES),
                    help="dtype of the true-ΔL evaluations (float32 is ~3× faster on CPU)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[i / 10 for i in range(10)])
    ap.add_argument("--table-ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--taylor2-models", nargs="*", default=["digits_cnn"],
                    help="models on which to also compute the single-channel second-order Taylor "
                         "predictor (one nested-jvp evaluation per channel: slow on the ResNet)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=RESULTS_DIR)
    ap.add_argument("--note", default="")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    unknown = [c for c in (args.criteria or []) + args.exclude if c not in oba_ext.CRITERIA]
    if unknown:
        ap.error(f"--criteria: unknown {unknown}; registered: {sorted(oba_ext.CRITERIA)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(torch.device("cpu"))
    for name in args.models:
        md = [f"<!-- generated by benchmarks/fidelity.py at {env['timestamp']} (git {env['git_sha']}, "
              f"torch {env['torch']}) -->\n"]
        run_model(name, args, env, md)
        path = os.path.join(args.out, f"fidelity_{name}.md")
        with open(path, "w") as f:
            f.write("\n".join(md) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
