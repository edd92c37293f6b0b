"""One benchmark harness for every oba_ext benchmark (modelled on Liger-Kernel's).

A benchmark is a sweep of one variable ``x_name`` over ``x_values`` and a table of *providers*
(``{name: setup}``). For each x and provider, ``setup(x) -> Case`` builds the inputs once and
returns the callable to time plus its work (bytes moved, FLOPs). The harness then

1. warms up (``warmup`` calls; the first call also compiles/captures whatever it needs),
2. times ``rep`` calls one by one: CUDA events around each call on a GPU (after a
   synchronize), ``time.perf_counter`` on the CPU,
3. reports p20/p50/p80 of the per-call times (ms), the achieved GB/s and/or TFLOP/s at those
   quantiles, and the peak memory of one extra call:
   - CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
     the memory allocated before the call (so inputs are not counted);
   - CPU: the peak of the running sum of allocation/free events in a ``torch.profiler``
     memory trace of one call (``profile_memory=True``). This counts every tensor the call
     allocates through torch's CPU allocator, minus what it frees, at its highest point.
     (``tracemalloc`` does not see torch's allocator, and RSS deltas are dominated by the
     allocator's caching, so neither is used.) ``memory_method`` in the CSV says which.
4. appends the rows to a long-format CSV (:data:`COLUMNS`): one row per
   (benchmark, provider, x, metric) with p20/p50/p80, plus device name, torch, CUDA and
   Python versions, git sha, timestamp, a free-text ``note`` (e.g. "preliminary: shared
   machine") and a JSON ``config`` with the fixed parameters of the sweep.

``benchmarks/plot.py`` turns any such CSV into PNGs.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

#: the long-format CSV header shared by every benchmark
COLUMNS = ("timestamp", "git_sha", "device", "torch", "cuda", "python", "benchmark", "provider",
           "x_name", "x_value", "metric", "unit", "p20", "p50", "p80", "dtype", "repeats",
           "memory_method", "config", "note")

QUANTILES = (0.2, 0.5, 0.8)


@dataclass
class Case:
    """What a provider's setup returns for one x.

    fn: the call to time (no arguments; its result is discarded).
    bytes: bytes one call must read+write at minimum (for GB/s), or None.
    flops: floating-point operations of one call (for TFLOP/s), or None.
    info: extra facts recorded in the row's ``config`` (e.g. ``{"impl": "reference"}``).
    """

    fn: Callable[[], Any]
    bytes: Optional[float] = None
    flops: Optional[float] = None
    info: Dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- environment

def git_sha() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    proc = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    proc = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {proc} ({torch.get_num_threads()} threads)"


def environment(device: torch.device) -> Dict[str, str]:
    """The columns that identify where and with what a row was measured."""
    return {"timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "git_sha": git_sha(), "device": device_name(device), "torch": torch.__version__,
            "cuda": str(torch.version.cuda), "python": platform.python_version()}


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda when available else cpu; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device: {name!r} requested but no CUDA device is visible")
    return dev


# ---------------------------------------------------------------- measuring

def quantiles(values: Sequence[float], qs: Sequence[float] = QUANTILES) -> List[float]:
    """Linear-interpolated quantiles (numpy's default method) of ``values``."""
    v = sorted(values)
    if not v:
        raise ValueError("quantiles: no values")
    out = []
    for q in qs:
        pos = q * (len(v) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        out.append(v[lo] + (v[hi] - v[lo]) * (pos - lo))
    return out


def time_call(fn: Callable[[], Any], device: torch.device, warmup: int = 3, rep: int = 20,
              max_seconds: Optional[float] = None) -> List[float]:
    """Per-call times in ms of ``rep`` calls after ``warmup`` calls.

    ``max_seconds`` stops repeating early (keeping at least 3 samples) when calls are slow.
    """
    if rep < 1 or warmup < 0:
        raise ValueError(f"time_call: rep must be >= 1 and warmup >= 0, got rep={rep}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    times: List[float] = []
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    t_start = time.perf_counter()
    for _ in range(rep):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if max_seconds is not None and len(times) >= 3 and time.perf_counter() - t_start > max_seconds:
            break
    return times


def time_paired(fn: Callable[[], Any], ref: Callable[[], Any], device: torch.device, warmup: int = 3,
                rep: int = 20, max_seconds: Optional[float] = None) -> Tuple[List[float], List[float]]:
    """Per-call times in ms of ``fn`` and of ``ref``, called alternately (``ref, fn, fn, ref,
    ...``: each pair in both orders, so a slow drift of the machine's speed cancels), after
    ``warmup`` calls of each. ``times[i] / ref_times[i]`` is a ratio from one pair of calls
    made back to back; the median of these paired ratios is much less sensitive to a shared
    machine's speed changing between providers than a ratio of separately measured medians."""
    if rep < 1 or warmup < 0:
        raise ValueError(f"time_paired: rep must be >= 1 and warmup >= 0, got rep={rep}, warmup={warmup}")
    for _ in range(warmup):
        ref()
        fn()
    times: List[float] = []
    ref_times: List[float] = []
    t_start = time.perf_counter()
    for i in range(rep):
        order = ((ref_times, ref), (times, fn)) if i % 2 == 0 else ((times, fn), (ref_times, ref))
        for out, f in order:
            out.append(time_call(f, device, warmup=0, rep=1)[0])
        if max_seconds is not None and len(times) >= 3 and time.perf_counter() - t_start > max_seconds:
            break
    return times, ref_times


def _cpu_peak_bytes(fn: Callable[[], Any]) -> float:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    from torch.autograd import DeviceType
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return float(peak)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> Tuple[float, str]:
    """(peak bytes allocated by one call beyond what was allocated before it, method name)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - base), "cuda.max_memory_allocated"
    return _cpu_peak_bytes(fn), "torch.profiler memory trace"


# ---------------------------------------------------------------- running a sweep

def measure(case: Case, device: torch.device, warmup: int, rep: int,
            max_seconds: Optional[float] = None, memory: bool = True,
            ref: Optional[Tuple[str, Callable[[], Any]]] = None) -> Dict[str, Any]:
    """Time and (optionally) memory-profile one case; returns metric -> (unit, [p20, p50, p80]).

    ``ref = (name, fn)``: time the case alternately with ``fn`` (:func:`time_paired`) and add
    the metric ``ratio_to_<name>``: the p20/p50/p80 of the paired time ratios."""
    if ref is not None:
        times, ref_times = time_paired(case.fn, ref[1], device, warmup, rep, max_seconds)
    else:
        times = time_call(case.fn, device, warmup, rep, max_seconds)
    q = quantiles(times)
    out: Dict[str, Any] = {"time": ("ms", q), "_n": len(times)}
    if ref is not None:
        out[f"ratio_to_{ref[0]}"] = ("x", quantiles([t / max(r, 1e-12) for t, r in zip(times, ref_times)]))
    if case.bytes:
        # the fastest quantile (p20 time) is the highest bandwidth: report p20 of GB/s from p80 time
        out["bandwidth"] = ("GB/s", [case.bytes / (t * 1e-3) / 1e9 for t in reversed(q)])
    if case.flops:
        out["throughput"] = ("TFLOP/s", [case.flops / (t * 1e-3) / 1e12 for t in reversed(q)])
    if memory:
        peak, method = peak_memory(case.fn, device)
        out["peak_memory"] = ("MB", [peak / 2**20] * 3)
        out["_memory_method"] = method
    return out


def rows_for(benchmark: str, provider: str, x_name: str, x_value, result: Mapping[str, Any],
             env: Mapping[str, str], dtype: str = "", config: Optional[Mapping[str, Any]] = None,
             note: str = "") -> List[Dict[str, Any]]:
    """Long-format rows (one per metric) for one measured case."""
    rows = []
    for metric, val in result.items():
        if metric.startswith("_"):
            continue
        unit, (p20, p50, p80) = val
        rows.append({**env, "benchmark": benchmark, "provider": provider, "x_name": x_name,
                     "x_value": x_value, "metric": metric, "unit": unit, "p20": f"{p20:.6g}",
                     "p50": f"{p50:.6g}", "p80": f"{p80:.6g}", "dtype": dtype,
                     "repeats": result.get("_n", ""),
                     "memory_method": result.get("_memory_method", "") if metric == "peak_memory" else "",
                     "config": json.dumps(dict(config or {}), sort_keys=True, default=str),
                     "note": note})
    return rows


def append_csv(path: str, rows: Iterable[Mapping[str, Any]]) -> int:
    """Append rows to ``path`` (header written when the file is new); returns the row count."""
    rows = list(rows)
    if not rows:
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header is not None and tuple(header) != COLUMNS:
            raise ValueError(f"append_csv: {path} has columns {header}, expected {list(COLUMNS)}; "
                             f"write to a new file")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in COLUMNS})
    return len(rows)


def run_sweep(benchmark: str, x_name: str, x_values: Sequence, providers: Mapping[str, Callable[[Any], Case]],
              device: torch.device, csv_path: Optional[str], *, dtype: str = "", warmup: int = 3,
              rep: int = 20, max_seconds: Optional[float] = None, memory: bool = True,
              config: Optional[Mapping[str, Any]] = None, note: str = "",
              on_error: str = "record", paired_with: Optional[str] = None) -> List[Dict[str, Any]]:
    """Measure every provider at every x; append the rows to ``csv_path`` (if given) and return them.

    ``paired_with``: a provider name; every other provider is timed alternately with it
    (:func:`time_paired`) and gets a ``ratio_to_<paired_with>`` row (paired ratios) and
    ``config.ratio = "paired with <name>"``. ``max_seconds`` then bounds the pairs, so a
    provider gets about half the samples it would alone.

    A provider whose setup or run raises (kernels not built; a peer library that cannot handle
    the model, e.g. forward-mode AD through torch's fused attention) is skipped with a printed
    reason when ``on_error="record"``, so the other providers' rows are still written;
    ``on_error="raise"`` re-raises (tests use it).
    """
    env = environment(device)
    all_rows: List[Dict[str, Any]] = []
    if paired_with is not None and paired_with in providers:  # the reference runs first
        providers = {paired_with: providers[paired_with],
                     **{k: v for k, v in providers.items() if k != paired_with}}
    for x in x_values:
        ref = None
        for name, setup in providers.items():
            try:
                case = setup(x)
            except Exception as e:  # noqa: BLE001 - reported, not hidden
                if on_error == "raise":
                    raise
                print(f"[{benchmark}] {name} @ {x_name}={x}: skipped ({type(e).__name__}: {e})")
                continue
            try:
                res = measure(case, device, warmup, rep, max_seconds, memory,
                              ref if name != paired_with else None)
                if name == paired_with:
                    ref = (name, case.fn)
            except Exception as e:  # noqa: BLE001 - reported, not hidden
                if on_error == "raise":
                    raise
                print(f"[{benchmark}] {name} @ {x_name}={x}: failed ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''})")
                continue
            cfg = {**(config or {}), **case.info}
            if ref is not None and name != paired_with:
                cfg["ratio"] = f"paired with {paired_with}"  # how ratio_to_* was measured
            rows = rows_for(benchmark, name, x_name, x, res, env, dtype, cfg, note)
            all_rows += rows
            t = res["time"][1]
            extra = "".join(f"  {m} {res[m][1][1]:.3g} {res[m][0]}" for m in ("bandwidth", "throughput",
                                                                             "peak_memory") if m in res)
            print(f"[{benchmark}] {name:<24} {x_name}={x!s:<14} p50 {t[1]:9.3f} ms "
                  f"(p20 {t[0]:.3f}, p80 {t[2]:.3f}){extra}")
        if csv_path is not None:
            append_csv(csv_path, [r for r in all_rows if r["x_value"] == x])
    return all_rows


def median_of(rows: Sequence[Mapping[str, Any]], provider: str, x_value, metric: str = "time") -> Optional[float]:
    for r in rows:
        if r["provider"] == provider and r["x_value"] == x_value and r["metric"] == metric:
            return float(r["p50"])
    return None


def add_common_args(parser, default_csv: str) -> None:
    """CLI flags every benchmark script shares."""
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    parser.add_argument("--rep", type=int, default=20, help="timed calls per case")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop repeating a case after this many seconds (>= 3 samples kept)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory call")
    parser.add_argument("--csv", default=os.path.join(RESULTS_DIR, default_csv),
                        help="long-format CSV to append to ('-' to not write)")
    parser.add_argument("--note", default="", help="free text stored in every row, e.g. 'preliminary'")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")


def apply_common_args(args) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.csv == "-":
        args.csv = None
    return resolve_device(args.device)


def parse_shapes(specs: Sequence[str], name: str) -> List[tuple]:
    """``["64x256x16x16", "8x3"]`` -> ``[(64, 256, 16, 16), (8, 3)]``; clear error otherwise."""
    out = []
    for s in specs:
        try:
            shape = tuple(int(v) for v in s.lower().split("x"))
        except ValueError:
            raise SystemExit(f"{name}: expected sizes like 64x256x16x16, got {s!r}") from None
        if not shape or min(shape) < 1:
            raise SystemExit(f"{name}: sizes must be positive, got {s!r}")
        out.append(shape)
    return out
