"""Fast checks of the benchmark and fidelity scripts (tiny sizes; CPU).

What is proved here (not just "it runs"):
- the harness's quantiles, CSV format and peak-memory measure;
- the fidelity oracle's removal (a forward-hook mask) equals zeroing the weight row and bias;
- the sign/scale conventions the fidelity study relies on: shrinking a channel by ε changes
  the loss by −ε·taylor + ½ε²·exact + O(ε³) (so −taylor and delta_exact are ΔL predictions);
- each script runs end to end at tiny sizes and writes what it says it writes.
"""
import csv
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed
from benchmarks import fidelity_oracle as oracle  # noqa: E402
from benchmarks import fidelity_report as report  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks.fidelity_models import CifarResNet, DigitsCNN, Split, evaluate  # noqa: E402
from tolerances import (DELTA_LOSS_REMAINDER, DELTA_LOSS_RTOL, DELTA_LOSS_SUM_RTOL, F64_SAME_FORMULA, FD_ABS,
                        FD_RTOL, FD_STEP, assert_f64)


# ---------------------------------------------------------------- harness

def test_quantiles_match_numpy():
    np = pytest.importorskip("numpy")
    v = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 7.5]
    assert harness.quantiles(v) == pytest.approx(list(np.quantile(v, [0.2, 0.5, 0.8])))
    with pytest.raises(ValueError, match="no values"):
        harness.quantiles([])


def test_cpu_peak_memory_sees_torch_allocations():
    n = 1 << 20  # 4 MiB float32 temporaries
    x = torch.ones(n)

    def two_temporaries():
        a = x * 2  # 4 MiB
        b = a + 1  # 4 MiB while a is alive: peak 8 MiB
        return b.sum()

    peak, method = harness.peak_memory(two_temporaries, torch.device("cpu"))
    assert method == "torch.profiler memory trace"
    assert 8 * 2**20 <= peak < 9 * 2**20


def test_run_sweep_writes_long_format_csv(tmp_path):
    path = str(tmp_path / "r.csv")
    x = torch.randn(64, 64)
    providers = {"mm": lambda n: harness.Case(lambda: x[:n] @ x, flops=2.0 * n * 64 * 64,
                                              bytes=4.0 * (n * 64 + 64 * 64 + n * 64), info={"k": 1})}
    rows = harness.run_sweep("demo", "n", [8, 16], providers, torch.device("cpu"), path,
                             warmup=1, rep=3, note="unit test", on_error="raise")
    with open(path, newline="") as f:
        got = list(csv.DictReader(f))
    assert tuple(got[0]) == harness.COLUMNS
    assert len(got) == len(rows) == 2 * 4  # time, bandwidth, throughput, peak_memory per x
    assert {r["metric"] for r in got} == {"time", "bandwidth", "throughput", "peak_memory"}
    for r in got:
        assert float(r["p20"]) <= float(r["p50"]) <= float(r["p80"])
        assert r["note"] == "unit test" and json.loads(r["config"]) == {"k": 1}
        assert r["git_sha"] and r["torch"] == torch.__version__
    # a provider whose setup fails is skipped (recorded) unless asked to raise
    bad = {"broken": lambda n: (_ for _ in ()).throw(RuntimeError("no kernels"))}
    assert harness.run_sweep("demo", "n", [8], bad, torch.device("cpu"), None, rep=1) == []
    with pytest.raises(RuntimeError, match="no kernels"):
        harness.run_sweep("demo", "n", [8], bad, torch.device("cpu"), None, rep=1, on_error="raise")


def test_paired_timing_alternates_and_gives_paired_ratios(tmp_path, monkeypatch):
    """The reference provider runs first and alternates with each other provider (ref, fn,
    fn, ref, ...); each ``ratio_to_<ref>`` row is the quantiles of the per-pair ratios."""
    calls = []
    clock = {"t": 0.0}

    def fake(name, ms):  # advances a fake clock: call times are exact, ratios known
        def fn():
            calls.append(name)
            clock["t"] += ms / 1e3
        return fn

    providers = {"slow": lambda n: harness.Case(fake("slow", 30.0)),
                 "ref": lambda n: harness.Case(fake("ref", 10.0))}
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock["t"])
    rows = harness.run_sweep("demo", "n", [1], providers, torch.device("cpu"), None, warmup=1,
                             rep=4, memory=False, on_error="raise", paired_with="ref")
    monkeypatch.undo()
    # ref measured alone first (1 warmup + 4), then: warmup (ref, slow), then ref/slow alternating
    assert calls[:5] == ["ref"] * 5
    assert calls[5:] == ["ref", "slow", "ref", "slow", "slow", "ref", "ref", "slow", "slow", "ref"]
    ratio = [r for r in rows if r["metric"] == "ratio_to_ref"]
    assert [r["provider"] for r in ratio] == ["slow"]
    assert [float(ratio[0][q]) for q in ("p20", "p50", "p80")] == pytest.approx([3.0, 3.0, 3.0])
    assert json.loads(ratio[0]["config"])["ratio"] == "paired with ref"


def test_append_csv_refuses_a_foreign_header(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="expected"):
        harness.append_csv(str(p), [{"benchmark": "x"}])


def test_plot_writes_one_png_per_metric(tmp_path):
    from benchmarks import plot
    path = str(tmp_path / "r.csv")
    x = torch.randn(32, 32)
    harness.run_sweep("demo", "shape", ["8x32", "16x32"], {"a": lambda s: harness.Case(lambda: x @ x)},
                      torch.device("cpu"), path, warmup=0, rep=2, memory=False)
    out = plot.plot_csv(path, str(tmp_path / "plots"))
    assert len(out) == 1 and os.path.getsize(out[0]) > 1000


# ---------------------------------------------------------------- fidelity oracle

def _tiny_data(n=48, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, 1, size, size, generator=g), torch.randint(0, 10, (n,), generator=g))


@pytest.mark.parametrize("make,name", [(DigitsCNN, "conv2"), (DigitsCNN, "fc1"),
                                       (lambda: CifarResNet(n=1, width=4), "layer2.0.conv1")])
def test_channel_mask_equals_zeroing_row_and_bias(make, name):
    torch.manual_seed(0)
    model = make().double().eval()
    data = _tiny_data(size=8 if isinstance(model, DigitsCNN) else 32)
    mod = dict(model.named_modules())[name]
    keep = torch.ones(mod.weight.shape[0], dtype=torch.bool)
    keep[[0, 2]] = False
    with oracle.channel_mask(model, {name: keep}):
        masked = evaluate(model, data)
    with torch.no_grad():
        mod.weight[~keep] = 0
        if mod.bias is not None:
            mod.bias[~keep] = 0
    assert masked[0] == pytest.approx(evaluate(model, data)[0], rel=F64_SAME_FORMULA, abs=0)


def test_masks_lowest_global_and_per_layer():
    v = {"a": torch.tensor([3.0, 1.0, 2.0, 0.5]), "b": torch.tensor([0.1, 5.0])}
    g = oracle.masks_lowest(v, 0.5, "global")  # 3 of 6 lowest: b0, a3, a1
    assert g["a"].tolist() == [True, False, True, False] and g["b"].tolist() == [False, True]
    p = oracle.masks_lowest(v, 0.5, "per_layer")  # 2 of a, 1 of b
    assert p["a"].tolist() == [True, False, True, False] and p["b"].tolist() == [False, True]
    with pytest.raises(ValueError, match="ratio"):
        oracle.masks_lowest(v, 1.0, "global")
    with pytest.raises(ValueError, match="mode"):
        oracle.masks_lowest(v, 0.1, "sideways")


class _SmoothNet(nn.Module):
    """Tanh everywhere, no max-pool: no kinks, so L(θ − εθ_c) is smooth in ε (ReLU/max-pool kinks
    crossed by the shrink add O(ε²) terms that no Hessian sees)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(6 * 16, 8)
        self.fc2 = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


def test_delta_conventions_match_a_finite_shrink():
    """Sign and scale conventions the fidelity study relies on, float64, smooth model:

    - one channel c scaled by 1−ε: ΔL = −ε·taylor_c + O(ε²) (so −taylor predicts ΔL);
    - every target parameter scaled by 1−ε (all layers' outputs): ΔL = −ε·Σtaylor + ½ε²·Σexact
      + O(ε³). ``exact``'s channel scores θ_c·(Hθ)_c are shares of the *whole-network* quadratic
      form θᵀHθ (SPEC §2), not the single-channel curvature θ_cᵀH_ccθ_c — which is why
      delta_exact is only an approximate predictor of a single channel's removal ΔL.
    """
    import oba_ext
    torch.manual_seed(0)
    model = _SmoothNet().double().eval()
    data = _tiny_data(n=32)
    batches = data.batches(32)
    kw = dict(granularity="out", impl="reference", progress=False, dtype=torch.float64)
    taylor = oba_ext.score(model, batches, kind="taylor", **kw)
    exact = oba_ext.score(model, batches, kind="exact", **kw)
    base, _ = evaluate(model, data)
    eps = FD_STEP
    names = ("conv1", "conv2", "fc1", "fc2")
    for name in names:
        c = taylor[name].out.numel()
        for o in range(c):
            scale = torch.ones(c, dtype=torch.float64)
            scale[o] = 1 - eps
            with oracle.channel_mask(model, {name: scale}):
                got = evaluate(model, data)[0] - base
            first = -eps * taylor[name].out[o].item()
            assert abs(got - first) < (DELTA_LOSS_RTOL * abs(first)
                                       + DELTA_LOSS_REMAINDER * eps ** 2 * abs(exact[name].out).max())
    with oracle.channel_mask(model, {n: torch.full((taylor[n].out.numel(),), 1 - eps,
                                                   dtype=torch.float64) for n in names}):
        got_all = evaluate(model, data)[0] - base
    first = -eps * sum(taylor[n].out.sum().item() for n in names)
    second = 0.5 * eps ** 2 * sum(exact[n].out.sum().item() for n in names)
    assert abs(got_all - first - second) < DELTA_LOSS_SUM_RTOL * abs(second), (got_all, first, second)
    assert abs(got_all - first) > 0.5 * abs(second)  # the second-order term is really tested


def test_prediction_rule_and_correlations():
    s = torch.tensor([1.0, -2.0, 3.0])
    assert report.prediction("taylor", s).tolist() == [-1.0, 2.0, -3.0]
    assert report.prediction("delta_exact", s).tolist() == [1.0, -2.0, 3.0]
    assert report.prediction("oba", s).tolist() == [1.0, 2.0, 3.0]
    delta = {"l": torch.tensor([-1.0, 2.0, -3.0, 4.0])}
    r = report.correlations("taylor", {"l": -delta["l"]}, delta)
    assert r["rho_global"] == pytest.approx(1.0) and r["rho_layer_mean"] == pytest.approx(1.0)
    r = report.correlations("oba", {"l": delta["l"]}, delta)  # |score| vs signed ΔL
    assert r["rho_abs"] == pytest.approx(1.0) and r["rho_global"] < 1.0
    assert math.isnan(report.spearman(torch.ones(5), torch.arange(5.0)))


def test_fidelity_script_end_to_end(tmp_path):
    from benchmarks import fidelity
    fidelity.main(["--models", "digits_cnn", "--criteria", "taylor", "oba", "magnitude_l1",
                   "--epochs", "1", "--heldout", "120", "--batch-size", "60", "--ratios", "0", "0.5", "--table-ratios", "0.5",
                   "--out", str(tmp_path), "--no-progress", "--note", "test", "--taylor2-models"])
    with open(tmp_path / "fidelity_spearman.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["criterion"] for r in rows} == {"taylor", "oba", "magnitude_l1"}
    for r in rows:
        assert -1.0 <= float(r["rho_global"]) <= 1.0
    with open(tmp_path / "fidelity_pruning.csv", newline="") as f:
        prows = list(csv.DictReader(f))
    assert {r["criterion"] for r in prows} == {"taylor", "oba", "magnitude_l1", "oracle_true_dL"}
    zero = {r["accuracy"] for r in prows if float(r["ratio"]) == 0.0}
    assert len(zero) == 1  # nothing removed: every criterion sees the same model
    with open(tmp_path / "fidelity_channels_digits_cnn.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 16 + 32 + 64 + 10
    md = (tmp_path / "fidelity_digits_cnn.md").read_text()
    assert "| taylor |" in md and "fidelity_digits_cnn_pruning.png" in md
    for png in ("fidelity_digits_cnn_scatter.png", "fidelity_digits_cnn_pruning.png"):
        assert os.path.getsize(tmp_path / png) > 1000


# ---------------------------------------------------------------- kernel / scoring benchmarks

def _results_agree(cases):
    """Every provider's case computes the same thing as the first one (float64)."""
    outs = {n: c.fn() for n, c in cases.items()}
    first_name, first = next(iter(outs.items()))
    flat = lambda o: torch.cat([t.double().flatten() for t in (o if isinstance(o, (tuple, list)) else [o])])
    for n, o in outs.items():
        assert_f64(flat(o), flat(first), f"{n} vs {first_name}")


def _available(provs):
    from oba_ext import _ext
    return {n: p for n, p in provs.items() if n != "kernel" or _ext.load()}


@pytest.mark.parametrize("channels_last", [False, True])
def test_op_providers_compute_the_same_thing(channels_last):
    from benchmarks import op_cases
    dev, dt = torch.device("cpu"), torch.float64
    red = _available(op_cases.channel_reduce_providers(1, dt, dev, channels_last=channels_last))
    _results_agree({n: p((3, 5, 4, 2)) for n, p in red.items()})
    lin = _available(op_cases.linear_weight_providers(2, dt, dev))
    assert "torch_func" in lin and "reference" in lin
    _results_agree({n: p((7, 5, 3)) for n, p in lin.items()})
    for groups in (1, 2):
        conv = _available(op_cases.conv_weight_providers(2, dt, dev, 3, 2, 1, groups, channels_last))
        _results_agree({n: p((2, 4, 6, 5, 6)) for n, p in conv.items()})


def test_bench_linear_and_conv_scripts(tmp_path):
    from benchmarks import bench_conv, bench_linear
    csv_path = str(tmp_path / "ops.csv")
    common = ["--rep", "2", "--warmup", "1", "--csv", csv_path, "--device", "cpu"]
    bench_linear.main(["--reduce-shapes", "16x8", "2x3x8", "--weight-shapes", "16x8x4"] + common)
    bench_conv.main(["--reduce-shapes", "2x4x3x3", "--weight-shapes", "2x4x5x5x4", "--groups", "2"] + common)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    got = {(r["benchmark"], r["provider"]) for r in rows}
    for bench in ("channel_score_reduce[linear]", "channel_score_reduce[conv,nchw]",
                  "channel_score_reduce[conv,channels_last]"):
        assert (bench, "reference") in got
    for bench in ("linear_weight_score", "conv_weight_score[k=3,s=1,g=2]"):
        assert {(bench, "reference"), (bench, "torch_func")} <= got
    assert {r["metric"] for r in rows if r["benchmark"].startswith("conv_weight")} >= {"time", "throughput"}
    assert {r["metric"] for r in rows if r["benchmark"].startswith("channel")} >= {"time", "bandwidth"}
    with pytest.raises(SystemExit, match="reduce-shapes"):
        bench_conv.main(["--reduce-shapes", "2x4x3"] + common)


def test_exact_oracles_in_bench_scoring_agree():
    from benchmarks import bench_scoring as bs
    torch.manual_seed(0)
    model = bs.TinyCNN().double().eval()
    x, y = torch.randn(3, 3, 6, 6, dtype=torch.float64), torch.tensor([0, 3, 1])
    jvp = bs.jvp_grad_case(model, x, y).fn()
    dbl = bs.double_backward_case(model, x, y).fn()
    for (name, a), b in zip(jvp.items(), dbl):
        assert_f64(a, b, f"jvp vs double backward {name}")
    # and the engine/reference exact scores are the channel sums of the same θ⊙Hθ
    case = bs.score_case(model, x, y, "exact", ("out",), "auto")
    q = case.fn()
    w, b = jvp["conv1.weight"], jvp["conv1.bias"]
    assert_f64(q["conv1"]["exact"]["out"].double(), w.sum((1, 2, 3)) + b, "conv1 exact out")
    assert case.info["impl"] in ("kernel", "reference")


def test_bench_scoring_script(tmp_path):
    from benchmarks import bench_scoring
    csv_path = str(tmp_path / "scoring.csv")
    rows = bench_scoring.main(["--models", "tiny_cnn", "--image", "8", "--batch", "2", "--rep", "2",
                               "--warmup", "0", "--device", "cpu", "--csv", csv_path, "--impl", "auto",
                               "--providers", "oba[out,in]", "reference:oba[out,in]",
                               "double_backward:exact"])
    provs = {r["provider"] for r in rows}
    assert provs == {"gradient", "oba[out,in]", "reference:oba[out,in]", "double_backward:exact"}
    ratios = {r["provider"]: float(r["p50"]) for r in rows if r["metric"] == "ratio_to_gradient"}
    assert ratios["gradient"] == pytest.approx(1.0) and all(v > 0 for v in ratios.values())
    impls = {r["provider"]: json.loads(r["config"])["impl"] for r in rows if r["metric"] == "time"}
    assert impls["reference:oba[out,in]"] == "reference"
    assert impls["oba[out,in]"] in ("kernel", "reference")  # what really ran is recorded
    with open(csv_path, newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    from benchmarks import plot, summarize
    table = summarize.scoring_tables(plot.latest(plot.read_rows(csv_path)))
    assert "| `reference:oba[out,in]` |" in table and "tiny_cnn (3x8x8, batch 2)" in table


def test_channel_taylor2_matches_finite_differences():
    """f'(0) = −taylor and f''(0) = central second difference, on a smooth float64 model."""
    import oba_ext
    torch.manual_seed(0)
    model = _SmoothNet().double().eval()
    data = _tiny_data(n=32)
    t2 = oracle.channel_taylor2(model, ["conv2", "fc1"], data, progress=False)
    taylor = oba_ext.score(model, data.batches(32), kind="taylor", granularity="out", impl="reference",
                           progress=False, dtype=torch.float64)
    base, h = evaluate(model, data)[0], FD_STEP
    for name in ("conv2", "fc1"):
        assert_f64(t2[name][0], -taylor[name].out, f"{name} first derivative")
        c = t2[name][1].numel()
        for o in range(c):
            vals = []
            for e in (-h, h):
                s = torch.ones(c, dtype=torch.float64)
                s[o] = 1 - e
                with oracle.channel_mask(model, {name: s}):
                    vals.append(evaluate(model, data)[0])
            fd = (vals[0] + vals[1] - 2 * base) / h ** 2
            assert fd == pytest.approx(t2[name][1][o].item(), rel=FD_RTOL, abs=FD_ABS)
