"""Top Hessian eigenvalues (Lanczos, as PyHessian does) and the Hessian trace (Hutchinson) of a
CIFAR ResNet, with oba_ext's curvature operator (README "Curvature products").

    python -m benchmarks.hessian_spectrum --model resnet20 --batches 2 --batch 32 --top 3 \\
        --samples 20 [--data-root ~/data/cifar10 --weights r20.pt]

Without ``--data-root`` it uses seeded synthetic 32×32 images (the numbers then only show the
mechanics). Every Hessian-vector product is one engine sweep per batch; ``eigsh`` (ARPACK's
implicitly restarted Lanczos) asks for as many products as it needs.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.sparse.linalg import eigsh

import oba_ext
from oba_ext.models import cifar_resnet


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet20", choices=["resnet20", "resnet32", "resnet56"])
    ap.add_argument("--weights", default=None, help="a state_dict file (torch.save)")
    ap.add_argument("--data-root", default=None, help="CIFAR-10 folder (torchvision format)")
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--top", type=int, default=3, help="how many top eigenvalues")
    ap.add_argument("--samples", type=int, default=20, help="Hutchinson samples")
    ap.add_argument("--kind", default="exact", choices=["exact", "ggn", "oba"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    model = getattr(cifar_resnet, args.model)(num_classes=10)
    if args.weights:
        model.load_state_dict(torch.load(args.weights, map_location="cpu"))
    model.eval()
    if args.data_root:
        from oba_ext.data import get_dataset, make_loader
        ds = get_dataset("cifar10", args.data_root, train=False)
        loader = make_loader(ds.dataset, batch_size=args.batch)
        batches = [b for _, b in zip(range(args.batches), loader)]
    else:
        g = torch.Generator().manual_seed(args.seed)
        batches = [(torch.randn(args.batch, 3, 32, 32, generator=g),
                    torch.randint(0, 10, (args.batch,), generator=g)) for _ in range(args.batches)]

    # the Hessian of the mean loss over these batches, as a scipy LinearOperator
    H = oba_ext.curvature_operator(model, batches, kind=args.kind)
    print(f"{args.model}: {H.shape[0]} target parameters, {len(batches)} batches of {args.batch}")

    t0 = time.perf_counter()
    top = eigsh(H, k=args.top, which="LA", return_eigenvectors=False, tol=1e-3)
    t1 = time.perf_counter()
    print(f"top {args.top} eigenvalues ({args.kind}): {np.sort(top)[::-1]}  "
          f"[{t1 - t0:.1f} s, Lanczos]")

    tr = oba_ext.hutchinson_trace(H, num_samples=args.samples, seed=args.seed)
    t2 = time.perf_counter()
    print(f"trace ≈ {tr:.6g} (Hutchinson, {args.samples} samples) [{t2 - t1:.1f} s]")
    return np.sort(top)[::-1], tr


if __name__ == "__main__":
    main()
