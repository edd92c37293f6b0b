"""End-to-end scoring cost: every score kind vs one ordinary gradient, on the same model and batch.

    python -m benchmarks.bench_scoring --models resnet18 mobilenet_v2 --batch 8 --image 32
    python -m benchmarks.bench_scoring --models vit_b_16 --vit-image 224 --vit-patch 16 --batch 2
    OMP_NUM_THREADS=1 python -m benchmarks.bench_scoring --threads 1 --models vit --vit-layers 6 \
        --vit-width 384 --vit-heads 6 --batch 16      # 65 tokens (32×32, patch 4)

Providers (one batch; the model in eval mode; float32 unless --dtype):

- ``gradient``: forward + backward to ∇_θ L — the unit every ratio is relative to;
- ``oba[out,in]``, ``oba[weight]``, ``exact[out,in]``, ``exact[weight]``, ``taylor[out,in]``,
  ``jacobian[out]``:
  one batch of ``oba_ext.score`` with ``impl=--impl`` (default "kernel": the engine; "auto"
  falls back to the reference path when a model cannot be captured). ``config.impl`` records
  the implementation that really ran (``scorer.impl``);
- ``reference:oba[out,in]``: the pure-autograd reference path (``impl="reference"``);
- ``oba[out,in]+recompute``, ``exact[weight]+recompute``: the engine with ``recompute=True``
  (activation checkpointing: less memory, about one more forward sweep of time);
- ``jvp_grad:exact``: θ⊙Hθ by ``torch.func.jvp(torch.func.grad(L), θ, θ)`` (forward-over-reverse);
- ``double_backward:exact``: θ⊙Hθ by reverse-over-reverse ``∇_θ(∇_θL · sg(θ))`` (what
  FastOBA does).

Curvature products along a fixed random direction ``v`` over the target parameters (README
"Curvature products"):

- ``hvp[exact]``, ``hvp[oba]``, ``hvp[ggn]``: ``scorer.hvp`` of the engine (``Hv``, ``Ĥv``,
  ``J_zᵀH_lossJ_z v``); ``hessian_trace[out]``: one Hutchinson sample of the ``hessian_trace``
  criterion at output channels (``score(kind="exact", direction=z)``, Rademacher ``z``);
- peers: ``jvp_grad:hvp`` (``torch.func.jvp(grad)`` along v), ``jvp_grad:hessian_trace[out]``
  (its Hz, then the per-channel reduction of ``z⊙Hz``); when installed (``pip install
  .[bench]``): ``curvlinops:hvp``, ``curvlinops:ggn``, ``curvlinops:hessian_trace[out]``
  (``HessianLinearOperator``/``GGNLinearOperator @ v``), ``backpack:hvp``, ``backpack:ggn``
  (``backpack.hessianfree``). Peers run on torch's math attention backend (the fused CPU
  kernel has neither forward-mode AD nor double backward).

What is timed for the score kinds is the per-batch call of the scorer that ``oba_ext.score``
builds (``scoring._make_scorer``): the one-time capture is excluded from the timing and
recorded as ``config.setup_ms``. Rows: time (p20/p50/p80), peak memory, and
``ratio_to_gradient`` per model. Every provider is timed alternately with the gradient
(``harness.time_paired``: gradient, provider, provider, gradient, ...), and its
``ratio_to_gradient`` row holds the p20/p50/p80 of the per-pair time ratios: on a shared machine
whose speed drifts by ±20% between minutes (seen on the 2-core CI VM) a ratio of two medians
measured minutes apart moved as much; paired ratios did not (rows before 2026-11-30 19:40 UTC
are ratios of medians). ``memory_ratio_to_gradient``: peak memory over the gradient's.
Appends to ``benchmarks/results/scoring.csv``.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, Tuple

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F
from torch import nn

from . import harness

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
#: provider -> (kind, granularity, impl override or None)
KIND_PROVIDERS: Dict[str, Tuple[str, Tuple[str, ...], str]] = {
    "oba[out,in]": ("oba", ("out", "in"), None),
    "oba[weight]": ("oba", ("weight",), None),
    "exact[out,in]": ("exact", ("out", "in"), None),
    "exact[weight]": ("exact", ("weight",), None),
    "taylor[out,in]": ("taylor", ("out", "in"), None),
    "jacobian[out]": ("jacobian", ("out",), None),
    "reference:oba[out,in]": ("oba", ("out", "in"), "reference"),
}
#: the engine with ``recompute=True`` (activation checkpointing): provider -> base provider
RECOMPUTE_PROVIDERS = {"oba[out,in]+recompute": "oba[out,in]",
                       "exact[weight]+recompute": "exact[weight]"}


class TinyCNN(nn.Module):
    """A seconds-fast model for smoke tests: (N, 3, H, W) -> (N, classes)."""

    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def build_model(name: str, args) -> Tuple[nn.Module, Tuple[int, int, int]]:
    """(model, input shape C×H×W) for a torchvision name, "vit_b_16" at --vit-image/--vit-patch,
    "vit" (torchvision's VisionTransformer with --vit-layers/--vit-width/--vit-heads, MLP 4×
    width) or "tiny_cnn"."""
    if name == "tiny_cnn":
        return TinyCNN(args.classes), (3, args.image, args.image)
    import torchvision
    if name == "vit6":  # timm ViT, 6 blocks of width 384, 6 heads, (image/patch)² + 1 tokens
        from timm.models.vision_transformer import VisionTransformer as TimmViT
        m = TimmViT(img_size=args.vit_image, patch_size=args.vit_patch, embed_dim=384, depth=6,
                    num_heads=6, num_classes=args.classes)
        return m, (3, args.vit_image, args.vit_image)
    if name == "vit_b_16":
        from torchvision.models import VisionTransformer
        m = VisionTransformer(image_size=args.vit_image, patch_size=args.vit_patch, num_layers=12,
                              num_heads=12, hidden_dim=768, mlp_dim=3072, num_classes=args.classes)
        return m, (3, args.vit_image, args.vit_image)
    if name == "vit":
        from torchvision.models import VisionTransformer
        m = VisionTransformer(image_size=args.vit_image, patch_size=args.vit_patch,
                              num_layers=args.vit_layers, num_heads=args.vit_heads,
                              hidden_dim=args.vit_width, mlp_dim=4 * args.vit_width,
                              num_classes=args.classes)
        return m, (3, args.vit_image, args.vit_image)
    try:
        m = torchvision.models.get_model(name, weights=None, num_classes=args.classes)
    except ValueError as e:
        raise SystemExit(f"--models: unknown model {name!r} ({e})") from None
    return m, (3, args.image, args.image)


def _theta(model):
    from oba_ext.targets import find_layers, target_parameters
    return target_parameters(find_layers(model))


def gradient_case(model, x, y) -> harness.Case:
    params = [p for p in model.parameters() if p.requires_grad]

    def call():
        loss = F.cross_entropy(model(x), y)
        return torch.autograd.grad(loss, params)
    return harness.Case(call, info={"impl": "autograd"})


def jvp_grad_case(model, x, y) -> harness.Case:
    theta = {k: v.detach() for k, v in _theta(model).items()}
    rest = {k: v.detach() for k, v in model.named_parameters() if k not in theta}
    buffers = dict(model.named_buffers())

    def loss_of(th):
        out = torch.func.functional_call(model, {**rest, **buffers, **th}, (x,))
        return F.cross_entropy(out, y)

    def call():
        # torch's math SDPA backend: the fused CPU attention kernel has no forward-mode AD
        with sdpa_kernel([SDPBackend.MATH]):
            _, hv = torch.func.jvp(torch.func.grad(loss_of), (theta,), (theta,))
        return {k: theta[k] * hv[k] for k in theta}
    return harness.Case(call, info={"impl": "torch.func.jvp(grad)"})


def double_backward_case(model, x, y) -> harness.Case:
    theta = _theta(model)
    names = list(theta)

    def call():
        with sdpa_kernel([SDPBackend.MATH]):  # the fused CPU kernel has no double backward
            loss = F.cross_entropy(model(x), y)
        g = torch.autograd.grad(loss, [theta[n] for n in names], create_graph=True)
        gv = sum((gi * theta[n].detach()).sum() for gi, n in zip(g, names))
        hv = torch.autograd.grad(gv, [theta[n] for n in names])
        return [theta[n].detach() * h for n, h in zip(names, hv)]
    return harness.Case(call, info={"impl": "autograd double backward"})


def score_case(model, x, y, kind: str, gran, impl: str, recompute: bool = False) -> harness.Case:
    from oba_ext import criteria, scoring
    from oba_ext.targets import find_layers
    crit = criteria.get(kind)
    layers = find_layers(model, include_norm=crit.norm_layers)
    loss = scoring.checked_loss(scoring.default_loss)
    keys = scoring._keys_for(tuple(gran))
    t0 = time.perf_counter()
    scorer = scoring._make_scorer(model, layers, loss, impl, crit, (x, y))
    if recompute:
        scoring.set_recompute(scorer)
    setup_ms = (time.perf_counter() - t0) * 1e3
    state = scoring._snapshot_buffers(model)

    def call():
        q = scorer(x, y, crit.quantities, keys)
        scoring._restore_buffers(model, state)
        return q
    info = {"impl": getattr(scorer, "impl", "reference"), "impl_requested": impl,
            "setup_ms": round(setup_ms, 1)}
    if recompute:
        info["recompute"] = True
    return harness.Case(call, info=info)


# ------------------------------------------------------------------ curvature products
def _direction(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g).to(p) for n, p in _theta(model).items()}


def _rademacher(model):
    from oba_ext.curvature import rademacher_direction
    return rademacher_direction({n: p.detach() for n, p in _theta(model).items()}, 0, 0, 0)


def _out_channel_sums(theta_names, z, hz, model):
    """Σ over each output row (and its bias) of z⊙Hz: the per-sample Hutchinson value."""
    out = {}
    for n in theta_names:
        layer, local = n.rsplit(".", 1)
        t = (z[n] * hz[n])
        t = t.reshape(t.shape[0], -1).sum(1) if local == "weight" else t
        out[layer] = out[layer] + t if layer in out else t
    return out


def hvp_case(model, x, y, kind: str, impl: str) -> harness.Case:
    from oba_ext import scoring
    from oba_ext.curvature import make_curvature_scorer
    from oba_ext.targets import find_layers
    layers = find_layers(model)
    loss = scoring.checked_loss(scoring.default_loss)
    t0 = time.perf_counter()
    scorer = make_curvature_scorer(model, layers, loss, impl, (x, y))
    setup_ms = (time.perf_counter() - t0) * 1e3
    state = scoring._snapshot_buffers(model)
    v = _direction(model)

    def call():
        out = scorer.hvp(x, y, kind, v)
        scoring._restore_buffers(model, state)
        return out
    return harness.Case(call, info={"impl": getattr(scorer, "impl", "reference"),
                                    "impl_requested": impl, "setup_ms": round(setup_ms, 1)})


def trace_case(model, x, y, impl: str) -> harness.Case:
    from oba_ext import scoring
    from oba_ext.curvature import make_curvature_scorer
    from oba_ext.targets import find_layers
    layers = find_layers(model)
    loss = scoring.checked_loss(scoring.default_loss)
    scorer = make_curvature_scorer(model, layers, loss, impl, (x, y))
    state = scoring._snapshot_buffers(model)
    z = _rademacher(model)

    def call():
        q = scorer(x, y, ("exact",), ("out",), direction=z)
        scoring._restore_buffers(model, state)
        return q
    return harness.Case(call, info={"impl": getattr(scorer, "impl", "reference"),
                                    "impl_requested": impl, "samples": 1})


def jvp_grad_hvp_case(model, x, y, trace: bool) -> harness.Case:
    theta = {k: v.detach() for k, v in _theta(model).items()}
    rest = {k: v.detach() for k, v in model.named_parameters() if k not in theta}
    buffers = dict(model.named_buffers())
    v = _rademacher(model) if trace else _direction(model)

    def loss_of(th):
        out = torch.func.functional_call(model, {**rest, **buffers, **th}, (x,))
        return F.cross_entropy(out, y)

    def call():
        with sdpa_kernel([SDPBackend.MATH]):
            _, hv = torch.func.jvp(torch.func.grad(loss_of), (theta,), (v,))
        return _out_channel_sums(list(theta), v, hv, model) if trace else hv
    return harness.Case(call, info={"impl": "torch.func.jvp(grad)"})


def curvlinops_case(model, x, y, which: str, trace: bool = False) -> harness.Case:
    import curvlinops
    theta = _theta(model)
    names = list(theta)
    params = [theta[n] for n in names]
    cls = {"hvp": curvlinops.HessianLinearOperator, "ggn": curvlinops.GGNLinearOperator}[which]
    with sdpa_kernel([SDPBackend.MATH]):
        op = cls(model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)
    d = _rademacher(model) if trace else _direction(model)
    vec = [d[n] for n in names]

    def call():
        with sdpa_kernel([SDPBackend.MATH]):
            hv = op @ vec
        if trace:
            return _out_channel_sums(names, d, dict(zip(names, hv)), model)
        return hv
    return harness.Case(call, info={"impl": f"curvlinops {curvlinops.__version__}"
                                    if hasattr(curvlinops, "__version__") else "curvlinops"})


def backpack_case(model, x, y, which: str) -> harness.Case:
    from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist
    from backpack.hessianfree.hvp import hessian_vector_product
    theta = _theta(model)
    names = list(theta)
    params = [theta[n] for n in names]
    d = _direction(model)
    vec = [d[n] for n in names]

    def call():
        with sdpa_kernel([SDPBackend.MATH]):
            out = model(x)
            loss = F.cross_entropy(out, y)
            if which == "hvp":
                return hessian_vector_product(loss, params, vec)
            return ggn_vector_product_from_plist(loss, out, params, vec)
    return harness.Case(call, info={"impl": "backpack.hessianfree"})


def _installed(mod: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(mod) is not None


def providers_for(model, x, y, impl: str, names) -> Dict[str, Callable]:
    provs: Dict[str, Callable] = {"gradient": lambda _: gradient_case(model, x, y)}
    for name, (kind, gran, override) in KIND_PROVIDERS.items():
        provs[name] = (lambda _, k=kind, g=gran, i=override or impl: score_case(model, x, y, k, g, i))
    for name, base in RECOMPUTE_PROVIDERS.items():
        kind, gran, override = KIND_PROVIDERS[base]
        provs[name] = (lambda _, k=kind, g=gran, i=override or impl:
                       score_case(model, x, y, k, g, i, recompute=True))
    provs["jvp_grad:exact"] = lambda _: jvp_grad_case(model, x, y)
    provs["double_backward:exact"] = lambda _: double_backward_case(model, x, y)
    for kind in ("exact", "oba", "ggn"):
        provs[f"hvp[{kind}]"] = lambda _, k=kind: hvp_case(model, x, y, k, impl)
    provs["hessian_trace[out]"] = lambda _: trace_case(model, x, y, impl)
    provs["jvp_grad:hvp"] = lambda _: jvp_grad_hvp_case(model, x, y, False)
    provs["jvp_grad:hessian_trace[out]"] = lambda _: jvp_grad_hvp_case(model, x, y, True)
    if _installed("curvlinops"):
        provs["curvlinops:hvp"] = lambda _: curvlinops_case(model, x, y, "hvp")
        provs["curvlinops:ggn"] = lambda _: curvlinops_case(model, x, y, "ggn")
        provs["curvlinops:hessian_trace[out]"] = lambda _: curvlinops_case(model, x, y, "hvp", True)
    if _installed("backpack"):
        provs["backpack:hvp"] = lambda _: backpack_case(model, x, y, "hvp")
        provs["backpack:ggn"] = lambda _: backpack_case(model, x, y, "ggn")
    unknown = [n for n in names or () if n not in provs]
    if unknown:
        raise SystemExit(f"--providers: unknown {unknown}; expected some of {list(provs)}")
    return {k: v for k, v in provs.items() if not names or k in names or k == "gradient"}


def ratio_rows(rows, model_name: str):
    """ratio_to_gradient (time and peak memory) rows for one model's measured rows."""
    grad = {r["metric"]: r for r in rows if r["provider"] == "gradient" and r["x_value"] == model_name}
    paired = {r["provider"] for r in rows if r["x_value"] == model_name and r["metric"] == "ratio_to_gradient"}
    out = []
    for r in rows:
        if r["x_value"] != model_name or r["metric"] not in ("time", "peak_memory") or r["metric"] not in grad:
            continue
        if r["metric"] == "time" and r["provider"] in paired:  # timed alternately with the gradient
            continue
        g = grad[r["metric"]]
        metric = "ratio_to_gradient" if r["metric"] == "time" else "memory_ratio_to_gradient"
        rr = {**r, "metric": metric, "unit": "x", "memory_method": ""}
        ratios = [float(r[q]) / max(float(g[q]), 1e-12) for q in ("p20", "p50", "p80")]
        # p50 is p50/p50; the p20/p80 columns hold the smallest/largest of the three quantile
        # ratios (ratios of quantiles need not be ordered)
        rr["p20"], rr["p50"], rr["p80"] = (f"{v:.4g}" for v in (min(ratios), ratios[1], max(ratios)))
        out.append(rr)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"],
                    help="resnet18 resnet50 vgg19_bn mobilenet_v2 vit_b_16 vit6 (timm, 6 blocks "
                         "of width 384) (any torchvision name) or tiny_cnn")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image", type=int, default=32, help="CNN input size (32 on CPU, 224 on GPU)")
    ap.add_argument("--vit-image", type=int, default=32)
    ap.add_argument("--vit-patch", type=int, default=4)
    ap.add_argument("--vit-layers", type=int, default=6, help='model "vit" only')
    ap.add_argument("--vit-width", type=int, default=384, help='model "vit" only')
    ap.add_argument("--vit-heads", type=int, default=6, help='model "vit" only')
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--impl", default="kernel", choices=["kernel", "auto"],
                    help="impl for the score kinds (the reference path is its own provider)")
    ap.add_argument("--providers", nargs="*", default=None, help="subset of providers (gradient always)")
    ap.add_argument("--seed", type=int, default=0)
    harness.add_common_args(ap, "scoring.csv")
    ap.set_defaults(rep=5, warmup=1)
    args = ap.parse_args(argv)
    device = harness.apply_common_args(args)
    all_rows = []
    for name in args.models:
        torch.manual_seed(args.seed)
        model, shape = build_model(name, args)
        model = model.to(device=device, dtype=DTYPES[args.dtype]).eval()
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn((args.batch, *shape), generator=g).to(device=device, dtype=DTYPES[args.dtype])
        y = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)
        provs = providers_for(model, x, y, args.impl, args.providers)
        cfg = {"batch": args.batch, "input": "x".join(map(str, shape)),
               "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}
        if name == "vit":
            cfg.update(vit_layers=args.vit_layers, vit_width=args.vit_width,
                       vit_heads=args.vit_heads, vit_patch=args.vit_patch)
        rows = harness.run_sweep("scoring", "model", [name], provs, device, None, dtype=args.dtype,
                                 warmup=args.warmup, rep=args.rep, max_seconds=args.max_seconds,
                                 memory=not args.no_memory, config=cfg, note=args.note,
                                 paired_with="gradient")
        rows += ratio_rows(rows, name)
        for r in rows:
            if r["metric"] == "ratio_to_gradient":
                print(f"[scoring] {name:<14} {r['provider']:<24} {r['p50']:>8}× gradient")
        if args.csv:
            harness.append_csv(args.csv, rows)
        all_rows += rows
        del model, x, y
    return all_rows


if __name__ == "__main__":
    main()
