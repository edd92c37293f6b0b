"""Model coverage: which torchvision/timm models the engine captures, and how closely it
matches the reference oracles (float64, random init, batch 2). Writes benchmarks/results/zoo.csv.

    .venv/bin/python -m benchmarks.zoo [--models convnext_tiny swin_t timm:vit_tiny_patch16_224 ...]

Per model and kind: the path that ran (``kernel`` = the engine; ``reference`` = a fallback, with
the reason), the worst relative Frobenius error over every layer and granularity against
``impl="reference"``, the layer where it occurs, the ops that used the generic rule, and time.
"""
from __future__ import annotations

import argparse
import csv
import os
import time
import warnings

import torch

import oba_ext
from oba_ext.models import get_model

DEFAULT = ["resnet18", "vgg11_bn", "mobilenet_v2", "convnext_tiny", "regnet_x_400mf",
           "shufflenet_v2_x0_5", "squeezenet1_1", "densenet121", "efficientnet_b0", "mnasnet0_5",
           "mobilenet_v3_small", "swin_t", "maxvit_t", "timm:vit_tiny_patch16_224",
           "timm:efficientnet_b0"]
SIZE = {"maxvit_t": 224}
KWARGS = {"timm:vit_tiny_patch16_224": dict(img_size=64)}  # timm ViTs assert their input size


def run(name, kind):
    torch.manual_seed(0)
    model = get_model(name if ":" in name else f"torchvision:{name}", num_classes=5,
                      **KWARGS.get(name, {})).double().eval()
    s = SIZE.get(name, 64)
    data = [(torch.randn(2, 3, s, s, dtype=torch.float64), torch.tensor([1, 3]))]
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eng = oba_ext.score(model, data, kind=kind, impl="auto", progress=False)
    secs = time.perf_counter() - t0
    msgs = [str(w.message) for w in caught]
    generic = sorted({m.split("no rule for ")[1].split(";")[0] for m in msgs if "no rule for" in m})
    fallback = next((m for m in msgs if "falling back" in m), "")
    row = dict(model=name, kind=kind, impl=eng.impl, layers=len(eng), seconds=round(secs, 2),
               generic_ops="; ".join(generic), fallback_reason=fallback[:300])
    if eng.impl == "kernel":
        ref = oba_ext.score(model, data, kind=kind, impl="reference", progress=False)
        worst, where = 0.0, ""
        for n in ref:
            for f, r in ref[n].tensors().items():
                err = (eng[n].tensors()[f] - r).norm().item() / max(r.norm().item(), 1e-300)
                if err > worst:
                    worst, where = err, f"{n}.{f}"
        row.update(worst_rel_err=f"{worst:.2e}", worst_at=where)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT)
    ap.add_argument("--kinds", nargs="+", default=["oba", "jacobian"])
    ap.add_argument("--csv", default=os.path.join(os.path.dirname(__file__), "results", "zoo.csv"))
    args = ap.parse_args(argv)
    rows = []
    for name in args.models:
        for kind in args.kinds:
            try:
                row = run(name, kind)
            except Exception as e:  # a model that cannot be built or scored is a result too
                row = dict(model=name, kind=kind, impl="error", fallback_reason=f"{type(e).__name__}: {e}"[:300])
            rows.append(row)
            print(" | ".join(f"{k}={v}" for k, v in row.items() if v != ""), flush=True)
    fields = ["model", "kind", "impl", "layers", "worst_rel_err", "worst_at", "generic_ops",
              "fallback_reason", "seconds"]
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in fields})
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
