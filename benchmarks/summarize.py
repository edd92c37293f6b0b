"""Markdown tables from harness CSVs (for the README), latest run per cell.

    python -m benchmarks.summarize benchmarks/results/scoring.csv   # models × providers
    python -m benchmarks.summarize benchmarks/results/linear.csv    # ops: p50 time, GB/s, TFLOP/s

scoring.csv → one table per device: rows = providers, columns = models, cells =
"p50 ms (ratio× gradient, peak MB) [impl]". Other CSVs → one table per benchmark: rows =
provider, columns = x, cells = "p50 ms · GB/s or TFLOP/s".
"""
from __future__ import annotations

import argparse
import json
from collections import OrderedDict
from typing import Dict, List

from .plot import latest, read_rows


def _cells(rows) -> Dict[tuple, Dict[str, dict]]:
    cells: Dict[tuple, Dict[str, dict]] = OrderedDict()
    for r in rows:
        cells.setdefault((r["provider"], r["x_value"]), {})[r["metric"]] = r
    return cells


def _table(header: List[str], body: List[List[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(b) + " |" for b in body]
    return "\n".join(out)


def scoring_tables(rows) -> str:
    parts = []
    for device in OrderedDict.fromkeys(r["device"] for r in rows):
        dev_rows = [r for r in rows if r["device"] == device]
        models = list(OrderedDict.fromkeys(r["x_value"] for r in dev_rows))
        provs = list(OrderedDict.fromkeys(r["provider"] for r in dev_rows))
        cells = _cells(dev_rows)
        body = []
        for p in provs:
            line = [f"`{p}`"]
            for m in models:
                c = cells.get((p, m), {})
                if "time" not in c:
                    line.append("—")
                    continue
                impl = json.loads(c["time"]["config"] or "{}").get("impl", "")
                ratio = c.get("ratio_to_gradient", {}).get("p50", "")
                mem = c.get("peak_memory", {}).get("p50", "")
                line.append(f"{float(c['time']['p50']):.1f} ms ({float(ratio):.2f}×"
                            + (f", {float(mem):.3g} MB" if mem else "") + f") {impl}")
            body.append(line)
        notes = sorted({r["note"] for r in dev_rows if r.get("note")})
        cfg = {m: json.loads(next(r["config"] for r in dev_rows if r["x_value"] == m)) for m in models}
        head = [f"{m} ({cfg[m].get('input', '')}, batch {cfg[m].get('batch', '')})" for m in models]
        parts.append(f"**{device}**, torch {dev_rows[0]['torch']}, git {dev_rows[0]['git_sha']}"
                     + (f" — {'; '.join(notes)}" if notes else "") + "\n\n"
                     + _table(["provider"] + head, body))
    return "\n\n".join(parts)


def op_tables(rows) -> str:
    parts = []
    for bench in OrderedDict.fromkeys(r["benchmark"] for r in rows):
        b_rows = [r for r in rows if r["benchmark"] == bench]
        xs = list(OrderedDict.fromkeys(r["x_value"] for r in b_rows))
        provs = list(OrderedDict.fromkeys(r["provider"] for r in b_rows))
        cells = _cells(b_rows)
        body = []
        for p in provs:
            line = [f"`{p}`"]
            for x in xs:
                c = cells.get((p, x), {})
                if "time" not in c:
                    line.append("—")
                    continue
                s = f"{float(c['time']['p50']):.3g} ms"
                if "bandwidth" in c:
                    s += f" · {float(c['bandwidth']['p50']):.3g} GB/s"
                if "throughput" in c:
                    s += f" · {float(c['throughput']['p50']):.3g} TFLOP/s"
                if "fraction_of_copy_bw" in c:
                    s += f" · {float(c['fraction_of_copy_bw']['p50']):.0%} of copy"
                line.append(s)
            body.append(line)
        r0 = b_rows[0]
        parts.append(f"**{bench}** ({r0['dtype']}, {r0['device']}"
                     + (f"; {r0['note']}" if r0.get("note") else "") + ")\n\n"
                     + _table(["provider"] + [f"{r0['x_name']}={x}" for x in xs], body))
    return "\n\n".join(parts)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", nargs="+")
    args = ap.parse_args(argv)
    for path in args.csv:
        rows = latest(read_rows(path))
        if not rows:
            continue
        print(scoring_tables(rows) if rows[0]["benchmark"] == "scoring" else op_tables(rows))
        print()


if __name__ == "__main__":
    main()
