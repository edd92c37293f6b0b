"""Conv-layer score ops vs their reference twins (and torch.func), over size sweeps.

    python -m benchmarks.bench_conv --reduce-shapes 64x256x16x16 32x64x56x56 \
        --weight-shapes 32x64x56x56x64 --kernel 3 --groups 1 --dtype float32 --note "..."

- ``channel_score_reduce`` on (N, C, H, W) activations, channel_dim=1, in NCHW and in
  channels-last memory (two benchmarks): time, GB/s (4 tensors read), peak memory.
- ``conv_weight_score`` (second order: 2 streams) for Conv2d on (N, C_in, H, W, C_out) with
  --kernel/--stride/--padding/--groups: time, TFLOP/s, peak memory.
- On CUDA the reduction's GB/s as a fraction of a large D2D copy (target ≥ 0.7).
Appends to ``benchmarks/results/conv.csv``.
"""
from __future__ import annotations

import argparse

from . import harness, op_cases
from .bench_linear import DTYPES, _by_name, run_copy_reference


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reduce-shapes", nargs="*", default=["64x256x16x16", "32x64x56x56"],
                    help="N x C x H x W activation shapes for channel_score_reduce")
    ap.add_argument("--layouts", nargs="+", default=["nchw", "channels_last"], choices=["nchw", "channels_last"])
    ap.add_argument("--weight-shapes", nargs="*", default=["32x64x56x56x64", "32x256x14x14x256"],
                    help="N x C_in x H x W x C_out for conv_weight_score")
    ap.add_argument("--kernel", type=int, default=3)
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--padding", type=int, default=1)
    ap.add_argument("--groups", type=int, default=1, help="C_in for depthwise")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--streams", type=int, default=2)
    ap.add_argument("--copy-bytes", type=int, default=1 << 30)
    harness.add_common_args(ap, "conv.csv")
    args = ap.parse_args(argv)
    device = harness.apply_common_args(args)
    dtype = DTYPES[args.dtype]
    common = dict(dtype=args.dtype, warmup=args.warmup, rep=args.rep, max_seconds=args.max_seconds,
                  memory=not args.no_memory, note=args.note)
    reduce_shapes = harness.parse_shapes(args.reduce_shapes, "--reduce-shapes")
    for s in reduce_shapes:
        if len(s) != 4:
            raise SystemExit(f"--reduce-shapes: expected N x C x H x W, got {s}")
    xs = ["x".join(map(str, s)) for s in reduce_shapes]
    kernel_rows = []
    for layout in args.layouts:
        provs = op_cases.channel_reduce_providers(1, dtype, device, channels_last=layout == "channels_last")
        rows = harness.run_sweep(f"channel_score_reduce[conv,{layout}]", "shape", xs,
                                 _by_name(provs, reduce_shapes), device, args.csv, **common)
        kernel_rows += [r for r in rows if r["provider"] == "kernel"]
    if device.type == "cuda" and kernel_rows:
        copy_gbps = run_copy_reference(device, args)
        extra = op_cases.fraction_of_copy(kernel_rows, copy_gbps)
        if args.csv:
            harness.append_csv(args.csv, extra)
        for r in extra:
            print(f"[{r['benchmark']}] kernel {r['x_value']}: {r['p50']} of copy bandwidth ({copy_gbps:.0f} GB/s)")
    weight_shapes = harness.parse_shapes(args.weight_shapes, "--weight-shapes")
    for s in weight_shapes:
        if len(s) != 5:
            raise SystemExit(f"--weight-shapes: expected N x C_in x H x W x C_out, got {s}")
    provs = op_cases.conv_weight_providers(args.streams, dtype, device, args.kernel, args.stride,
                                           args.padding, args.groups)
    bench = "conv_weight_score" + (f"[k={args.kernel},s={args.stride},g={args.groups}]"
                                   if (args.kernel, args.stride, args.groups) != (3, 1, 1) else "")
    harness.run_sweep(bench, "shape", ["x".join(map(str, s)) for s in weight_shapes],
                      _by_name(provs, weight_shapes), device, args.csv,
                      config={"k": args.kernel, "stride": args.stride, "groups": args.groups}, **common)


if __name__ == "__main__":
    main()
