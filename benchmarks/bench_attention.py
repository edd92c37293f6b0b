"""Attention two-stream kernels vs their O(N²) pure-PyTorch twins, over sequence lengths.

    python -m benchmarks.bench_attention --n 197 1024 4096 --heads 12 --head-dim 64 \
        --dtype float32 --note "..."

Ops (benchmark names): ``attention_two_stream_forward`` (O, Ȯ, lse with all tangents) and
``attention_second_order_backward[exact]`` (both streams with the softmax curvature, from a
saved lse). Providers: ``kernel`` (torch.ops.oba_ext: row blocks of GEMMs + one fused row pass) and
``reference`` (oba_ext.reference.attention: the plain math, N×N score matrices per head).
Metrics: p20/p50/p80 time (ms) and peak memory (MB) of one call, x = N (= N_q = N_k); B, H,
D in the row's ``config``. Appends to ``benchmarks/results/attention.csv`` (long format, see
harness.py: device, torch version, git sha, timestamp per row) and writes the PNGs of that
CSV with benchmarks/plot.py. Repeats shrink with N (``--max-seconds`` per case).
"""
from __future__ import annotations

import argparse

import torch

from . import harness, plot

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


def _inputs(n, B, H, D, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda: torch.randn(B, H, n, D, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return [r() for _ in range(8)]  # q, k, v, q̇, k̇, v̇, G_O, C_O


def providers(B, H, D, dtype, device, causal):
    from oba_ext.ops import attention as ops
    from oba_ext.reference import attention as ref

    def fwd(mod, impl):
        def setup(n):
            if impl == "kernel":
                from oba_ext import _ext
                if not _ext.kernels_available(device):
                    raise RuntimeError(f"no compiled kernels for {device}")
            q, k, v, qd, kd, vd, _, _ = _inputs(n, B, H, D, dtype, device)
            return harness.Case(lambda: mod.attention_two_stream_forward(q, k, v, qd, kd, vd, None,
                                                                         causal, None),
                                flops=_flops(B, H, n, D, 6), info=_info(B, H, D, impl, causal))
        return setup

    def bwd(mod, impl):
        def setup(n):
            if impl == "kernel":
                from oba_ext import _ext
                if not _ext.kernels_available(device):
                    raise RuntimeError(f"no compiled kernels for {device}")
            q, k, v, qd, kd, vd, go, co = _inputs(n, B, H, D, dtype, device)
            lse = ref.attention_two_stream_forward(q, k, v, None, None, None, None, causal,
                                                   None)[2]
            return harness.Case(lambda: mod.attention_second_order_backward(
                q, k, v, qd, kd, vd, go, co, None, causal, None, lse, True),
                flops=_flops(B, H, n, D, 15), info=_info(B, H, D, impl, causal))
        return setup

    return ({"kernel": fwd(ops, "kernel"), "reference": fwd(ref, "reference")},
            {"kernel": bwd(ops, "kernel"), "reference": bwd(ref, "reference")})


def _flops(B, H, n, D, matmuls):
    """FLOPs of the plain math: 2·N²·D per N×N×D matmul; the forward has 6 (QKᵀ, Q̇Kᵀ, QK̇ᵀ,
    AV, ȦV, AV̇), the exact backward 15 (S, Ṡ×2, G_A, C_A×2, G_V, C_V×2, G_Q, C_Q×2, G_K, C_K×2)."""
    return 2.0 * B * H * n * n * D * matmuls


def _info(B, H, D, impl, causal):
    return {"B": B, "H": H, "D": D, "impl": impl, "causal": causal}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="*", default=[197, 1024, 4096],
                    help="sequence lengths (N_q = N_k)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=None,
                    help="heads (default: 12 on CUDA, 4 on CPU to keep the twin in memory)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--no-plot", action="store_true")
    harness.add_common_args(ap, "attention.csv")
    ap.set_defaults(rep=10, max_seconds=20.0)
    args = ap.parse_args(argv)
    device = harness.apply_common_args(args)
    H = args.heads or (12 if device.type == "cuda" else 4)
    fwd, bwd = providers(args.batch, H, args.head_dim, DTYPES[args.dtype], device, args.causal)
    common = dict(dtype=args.dtype, warmup=1, rep=args.rep, max_seconds=args.max_seconds,
                  memory=not args.no_memory, note=args.note,
                  config={"B": args.batch, "H": H, "D": args.head_dim, "causal": args.causal})
    harness.run_sweep("attention_two_stream_forward", "N", args.n, fwd, device, args.csv,
                      **common)
    harness.run_sweep("attention_second_order_backward[exact]", "N", args.n, bwd, device,
                      args.csv, **common)
    if args.csv and not args.no_plot:
        for p in plot.plot_csv(args.csv):
            print(p)


if __name__ == "__main__":
    main()
