"""Turn any long-format benchmark CSV (``benchmarks/harness.py:COLUMNS``) into PNGs.

One figure per (benchmark, metric, dtype, device); one series per provider: the p50 with a
p20–p80 band (numeric x: lines, log-x when x spans > 10×; categorical x such as shapes or
model names: grouped bars with p20–p80 error bars). When a CSV holds several runs of the same
(provider, x, metric), the latest row (by timestamp) is plotted.

    python -m benchmarks.plot benchmarks/results/linear.csv [more.csv ...] [--out DIR]
"""
from __future__ import annotations

import argparse
import csv
import os
import re
from collections import OrderedDict, defaultdict
from typing import Dict, List, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_rows(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"benchmark", "provider", "x_name", "x_value", "metric", "unit", "p20", "p50", "p80"}
    if rows and not need <= set(rows[0]):
        raise SystemExit(f"{path}: not a harness CSV (missing columns {sorted(need - set(rows[0]))})")
    return rows


def latest(rows: Sequence[Dict[str, str]]) -> List[Dict[str, str]]:
    """Keep the newest row per (benchmark, provider, x, metric, dtype, device)."""
    best: "OrderedDict[Tuple, Dict[str, str]]" = OrderedDict()
    for r in rows:
        key = (r["benchmark"], r["provider"], r["x_value"], r["metric"], r.get("dtype", ""),
               r.get("device", ""))
        if key not in best or r.get("timestamp", "") >= best[key].get("timestamp", ""):
            best[key] = r
    return list(best.values())


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_")[:80]


def plot_group(rows: Sequence[Dict[str, str]], title: str, path: str) -> str:
    """Draw one figure from rows sharing benchmark/metric/dtype/device; returns ``path``."""
    xs: List[str] = []
    for r in rows:
        if r["x_value"] not in xs:
            xs.append(r["x_value"])
    numeric = all(_is_number(x) for x in xs)
    if numeric:
        xs.sort(key=float)
    series: Dict[str, Dict[str, Tuple[float, float, float]]] = defaultdict(dict)
    for r in rows:
        series[r["provider"]][r["x_value"]] = (float(r["p20"]), float(r["p50"]), float(r["p80"]))
    unit, x_name = rows[0]["unit"], rows[0]["x_name"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(xs) + 3), 4.2))
    if numeric:
        for prov, pts in series.items():
            xv = [x for x in xs if x in pts]
            p20, p50, p80 = zip(*(pts[x] for x in xv))
            xf = [float(x) for x in xv]
            ax.plot(xf, p50, marker="o", label=prov)
            ax.fill_between(xf, p20, p80, alpha=0.2)
        vals = [float(x) for x in xs]
        if min(vals) > 0 and max(vals) / min(vals) > 10:
            ax.set_xscale("log")
    else:
        n = len(series)
        width = 0.8 / max(n, 1)
        for i, (prov, pts) in enumerate(series.items()):
            idx = [j for j, x in enumerate(xs) if x in pts]
            p20, p50, p80 = zip(*(pts[xs[j]] for j in idx))
            pos = [j - 0.4 + width * (i + 0.5) for j in idx]
            err = [[max(m - lo, 0.0) for lo, m in zip(p20, p50)], [max(hi - m, 0.0) for m, hi in zip(p50, p80)]]
            ax.bar(pos, p50, width=width, yerr=err, capsize=2, label=prov)
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels(xs, rotation=30 if max(len(x) for x in xs) > 8 else 0, ha="right"
                           if max(len(x) for x in xs) > 8 else "center")
    ax.set_xlabel(x_name)
    ax.set_ylabel(f"{rows[0]['metric']} [{unit}] (p50, p20–p80)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_csv(path: str, out_dir: str = None) -> List[str]:
    """Write one PNG per (benchmark, metric, dtype, device) of ``path``; returns their paths."""
    rows = latest(read_rows(path))
    out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(path)), "plots")
    groups: "OrderedDict[Tuple, List[Dict[str, str]]]" = OrderedDict()
    for r in rows:
        groups.setdefault((r["benchmark"], r["metric"], r.get("dtype", ""), r.get("device", "")),
                          []).append(r)
    stem = os.path.splitext(os.path.basename(path))[0]
    written = []
    for (bench, metric, dtype, device), grp in groups.items():
        note = grp[0].get("note", "")
        title = f"{bench}: {metric} — {dtype or 'n/a'} — {device}" + (f"\n{note}" if note else "")
        name = _slug(f"{stem}_{bench}_{metric}_{dtype}_{device.split(':')[0]}") + ".png"
        written.append(plot_group(grp, title, os.path.join(out_dir, name)))
    return written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", nargs="+", help="harness CSV files")
    ap.add_argument("--out", default=None, help="output folder (default: <csv folder>/plots)")
    args = ap.parse_args(argv)
    for p in args.csv:
        if not os.path.exists(p):
            raise SystemExit(f"csv: {p} does not exist")
        for w in plot_csv(p, args.out):
            print(w)


if __name__ == "__main__":
    main()
