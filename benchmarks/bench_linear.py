"""Linear-layer score ops vs their reference twins (and torch.func), over size sweeps.

    python -m benchmarks.bench_linear --reduce-shapes 4096x1024 8x197x768 \
        --weight-shapes 4096x1024x1024 --dtype float32 --note "..."

- ``channel_score_reduce`` on activations (M, C) or (N, T, C), channel dim last (a Linear's
  output/input channels): p20/p50/p80 time, GB/s (4 tensors read), peak memory.
- ``linear_weight_score`` (second-order per-weight scores: 2 streams, ``[G, C]ᵀ[T, X]``) on
  (M, C_in, C_out): time, TFLOP/s, peak memory.
- On CUDA also a large device-to-device copy; the reduction's GB/s is reported as a fraction
  of it (metric ``fraction_of_copy_bw``, target ≥ 0.7).
Appends to ``benchmarks/results/linear.csv`` (long format, see harness.py).
"""
from __future__ import annotations

import argparse

import torch

from . import harness, op_cases

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


def run_copy_reference(device, args):
    """GB/s of a large D2D copy on ``device`` (CUDA only), appended as benchmark 'd2d_copy'."""
    rows = harness.run_sweep("d2d_copy", "bytes", [args.copy_bytes],
                             {"copy_": lambda n: op_cases.copy_bandwidth_case(device, n)}, device,
                             args.csv, warmup=args.warmup, rep=args.rep, memory=False, note=args.note)
    return float(harness.median_of(rows, "copy_", args.copy_bytes, "bandwidth"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reduce-shapes", nargs="*", default=["4096x1024", "8x197x768"],
                    help="activation shapes for channel_score_reduce (channel dim last)")
    ap.add_argument("--weight-shapes", nargs="*", default=["2048x768x768", "4096x1024x1024"],
                    help="M x C_in x C_out for linear_weight_score")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--streams", type=int, default=2, help="stream pairs for weight scores (2: second order)")
    ap.add_argument("--copy-bytes", type=int, default=1 << 30, help="size of the CUDA copy reference")
    harness.add_common_args(ap, "linear.csv")
    args = ap.parse_args(argv)
    device = harness.apply_common_args(args)
    dtype = DTYPES[args.dtype]
    common = dict(dtype=args.dtype, warmup=args.warmup, rep=args.rep, max_seconds=args.max_seconds,
                  memory=not args.no_memory, note=args.note)
    reduce_shapes = harness.parse_shapes(args.reduce_shapes, "--reduce-shapes")
    rows = harness.run_sweep("channel_score_reduce[linear]", "shape", ["x".join(map(str, s)) for s in reduce_shapes],
                             _by_name(op_cases.channel_reduce_providers(-1, dtype, device), reduce_shapes),
                             device, args.csv, **common)
    if device.type == "cuda":
        copy_gbps = run_copy_reference(device, args)
        extra = op_cases.fraction_of_copy([r for r in rows if r["provider"] == "kernel"], copy_gbps)
        if args.csv:
            harness.append_csv(args.csv, extra)
        for r in extra:
            print(f"[channel_score_reduce[linear]] kernel {r['x_value']}: {r['p50']} of copy bandwidth "
                  f"({copy_gbps:.0f} GB/s)")
    weight_shapes = harness.parse_shapes(args.weight_shapes, "--weight-shapes")
    for s in weight_shapes:
        if len(s) != 3:
            raise SystemExit(f"--weight-shapes: expected M x C_in x C_out, got {s}")
    harness.run_sweep("linear_weight_score", "shape", ["x".join(map(str, s)) for s in weight_shapes],
                      _by_name(op_cases.linear_weight_providers(args.streams, dtype, device), weight_shapes),
                      device, args.csv, **common)


def _by_name(providers, shapes):
    """Adapt setup(shape tuple) to the harness's x values (the 'AxBxC' strings)."""
    lookup = {"x".join(map(str, s)): s for s in shapes}
    return {name: (lambda x, f=f: f(lookup[x])) for name, f in providers.items()}


if __name__ == "__main__":
    main()
