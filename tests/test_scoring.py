"""The public API: oba_ext.score() — arguments, errors, averaging, side effects, and the
reference path on randomly assembled models against generic brute force (float64)."""
from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import brute
import oba_ext

from tolerances import F32_VS_F64_SCORES, F64_SAME_FORMULA, FLOAT64_RTOL as F64_RTOL


def _data(n=4, shape=(2, 6, 6), classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=dtype), torch.arange(n) % classes


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(3 * 36, 3)).double().eval()


# ---- bad input -------------------------------------------------------------------------------
def test_empty_batches():
    with pytest.raises(ValueError, match="batches: .*no batch"):
        oba_ext.score(small_cnn(), [], progress=False)


def test_batch_not_a_pair():
    x, _ = _data()
    with pytest.raises(TypeError, match=r"batches: item 0 must be a pair"):
        oba_ext.score(small_cnn(), [x], progress=False)


def test_loss_not_scalar():
    with pytest.raises(ValueError, match="loss_fn: must return a scalar"):
        oba_ext.score(small_cnn(), [_data()], progress=False,
                      loss_fn=lambda o, t: F.cross_entropy(o, t, reduction="none"))


@pytest.mark.parametrize("kw,match", [
    (dict(kind="hessian"), r"kind: unknown score kind 'hessian'"),
    (dict(granularity=("out", "rows")), r"granularity: unknown granularity 'rows'"),
    (dict(granularity=()), r"granularity: empty"),
    (dict(targets=["nope"]), r"targets: 'nope' is not a module"),
    (dict(targets=["1"]), r"targets: module '1' is a BatchNorm2d, not a target layer"),
    (dict(ignore=["nope"]), r"ignore: 'nope' is not a module"),
    (dict(impl="fast"), r"impl: expected one of"),
    (dict(max_batches=0), r"max_batches: expected a positive int"),
    (dict(dtype=torch.int32), r"dtype: expected a floating torch.dtype"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        oba_ext.score(small_cnn(), [_data()], progress=False, **kw)


def test_options_after_kind_are_keyword_only():
    """The simple call stays positional (model, batches, loss_fn, kind); everything after
    ``kind`` (what is scored, then where and how it runs) must be named."""
    data = [_data()]
    res = oba_ext.score(small_cnn(), data, None, "taylor", progress=False)
    assert set(res) == {"0", "4"}
    with pytest.raises(TypeError, match="positional"):
        oba_ext.score(small_cnn(), data, None, "taylor", ("out",))


def test_no_target_layers():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.ReLU())
    with pytest.raises(ValueError, match="model: Sequential has no target layers"):
        oba_ext.score(model, [(torch.randn(4, 3), torch.arange(4) % 3)], progress=False)
    with pytest.raises(ValueError, match="no target layers"):
        oba_ext.score(small_cnn(), [_data()], progress=False, ignore=["0", "4"])


def test_model_not_a_module():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        oba_ext.score(lambda x: x, [_data()], progress=False)


def test_mixed_devices():
    model = small_cnn()
    model[1].running_mean = model[1].running_mean.to("meta")
    with pytest.raises(ValueError, match="model: parameters and buffers are on mixed devices"):
        oba_ext.score(model, [_data()], progress=False)


def test_nan_is_reported_with_layer_name():
    model = small_cnn()
    x, y = _data()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"NaN in the '.*' score of layer '(0|4)' at batch 0"):
        oba_ext.score(model, [(x, y)], progress=False, impl="reference")


def test_inf_is_reported():
    model = small_cnn()
    with torch.no_grad():
        model[4].weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"(NaN|Inf) in the .* of layer"):
        oba_ext.score(model, [_data()], progress=False, impl="reference", kind="taylor")


# ---- semantics -------------------------------------------------------------------------------
def test_average_over_batches_and_keep_per_batch():
    model = small_cnn()
    b1, b2 = _data(seed=1), _data(seed=2)
    r1 = oba_ext.score(model, [b1], progress=False, impl="reference")
    r2 = oba_ext.score(model, [b2], progress=False, impl="reference")
    r = oba_ext.score(model, [b1, b2], progress=False, impl="reference", keep_per_batch=True)
    assert r.num_batches == 2
    for name in r:
        torch.testing.assert_close(r[name].out, (r1[name].out + r2[name].out) / 2, rtol=F64_SAME_FORMULA, atol=0)
        torch.testing.assert_close(r[name].per_batch["out"][1], r2[name].out, rtol=F64_SAME_FORMULA, atol=0)
    r3 = oba_ext.score(model, [b1, b2, b1], progress=False, impl="reference", max_batches=1)
    assert r3.num_batches == 1
    torch.testing.assert_close(r3["0"].out, r1["0"].out, rtol=0, atol=0)


def test_model_is_not_modified():
    model = small_cnn().train()  # train-mode BN would update running stats
    before = copy.deepcopy(model.state_dict())
    oba_ext.score(model, [_data(), _data(seed=3)], progress=False, impl="reference", kind="exact")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_dtype_and_device_copy():
    model = small_cnn().float()
    x, y = _data(dtype=torch.float32)
    r = oba_ext.score(model, [(x, y)], progress=False, impl="reference", dtype=torch.float64)
    assert r["0"].out.dtype == torch.float64
    assert next(model.parameters()).dtype == torch.float32
    r32 = oba_ext.score(model, [(x, y)], progress=False, impl="reference")
    assert r32["0"].out.dtype == torch.float32
    torch.testing.assert_close(r32["0"].out.double(), r["0"].out, rtol=F32_VS_F64_SCORES, atol=0)


def test_targets_ignore_and_tuple_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x1, x2):
            return self.head(torch.tanh(self.a(x1) + self.b(x2)))

    m = Two().double()
    batch = ((torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)),
             torch.arange(5) % 3)
    r = oba_ext.score(m, [batch], progress=False, impl="reference", targets=["a", "head"])
    assert set(r) == {"a", "head"}
    r = oba_ext.score(m, [batch], progress=False, impl="reference", ignore=[m.b])
    assert set(r) == {"a", "head"}


def test_summary_and_progress(capsys):
    """progress=True draws a bar that reaches n/n batches (on stderr, nothing on stdout);
    progress=False draws nothing; summary() has one row per (layer, granularity) with the
    shape, mean|s| and max|s| of that very tensor (as printed, 4 significant digits)."""
    batches = [_data(), _data()]
    capsys.readouterr()
    r = oba_ext.score(small_cnn(), batches, progress=True, impl="reference")
    out, err = capsys.readouterr()
    assert out == "" and "oba_ext.score[oba]" in err and "2/2" in err, err[-500:]
    oba_ext.score(small_cnn(), batches, progress=False, impl="reference")
    out, err = capsys.readouterr()
    assert "oba_ext.score" not in out + err
    assert r.impl == "reference"
    lines = r.summary().splitlines()
    assert lines[0].split() == ["layer", "gran", "shape", "mean|s|", "max|s|"]
    want = [(name, g, t) for name in r for g, t in r[name].by_key().items()]
    assert len(lines) == 1 + len(want) and len(want) >= 4
    for line, (name, g, t) in zip(lines[1:], want):
        cols = line.split()
        assert cols[0] == name and cols[1] == g, line
        assert line.split(")")[0].split("(")[1].replace(" ", "") == ",".join(map(str, t.shape)) + ("," if t.dim() == 1 else "")
        mean, mx = float(cols[-2]), float(cols[-1])
        assert f"{mean:.4e}" == f"{t.abs().double().mean().item():.4e}", line
        assert f"{mx:.4e}" == f"{t.abs().double().max().item():.4e}", line


# ---- unseen models: random mixes against generic brute force -------------------------------
class Block(nn.Module):
    def __init__(self, kind, c):
        super().__init__()
        self.kind = kind
        if kind == "conv_bn":
            self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=random.random() < 0.5), nn.BatchNorm2d(c)
        elif kind == "res":
            self.c1, self.c2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1, groups=random.choice([1, c]))
        elif kind == "cat":
            self.c1, self.c2 = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c, c - c // 2, 3, padding=1)
        elif kind == "pool":
            self.conv = nn.Conv2d(c, c, 2, stride=1)

    def forward(self, x):
        if self.kind == "conv_bn":
            return F.relu(self.bn(self.conv(x)))
        if self.kind == "res":
            return F.relu(x + self.c2(F.relu(self.c1(x))))
        if self.kind == "cat":
            return torch.cat([F.relu(self.c1(x)), F.relu(self.c2(x))], dim=1)
        return F.max_pool2d(F.relu(self.conv(x)), 2, stride=1, padding=0)


def random_relu_model(seed):
    random.seed(seed)
    torch.manual_seed(seed)
    c = random.choice([3, 4])
    blocks = [nn.Conv2d(2, c, 3, padding=1)] + [Block(random.choice(["conv_bn", "res", "cat", "pool"]), c)
                                               for _ in range(random.randint(2, 3))]
    model = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * c, 3)).double().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3); m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5); m.bias.data.uniform_(-0.3, 0.3)
    return model


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_unseen_relu_models_match_brute_force(seed):
    """ReLU/max-pool/eval-BN/residual/concat mixes: exact = H·θ and oba = (H − GGN)·θ (SPEC §2)."""
    model = random_relu_model(seed)
    x, y = _data(n=3, shape=(2, 5, 5), seed=seed)
    exact, oba = brute.hessian_and_ggn_scores(model, x, y)
    for kind, want in (("exact", exact), ("oba", oba)):
        r = oba_ext.score(model, [(x, y)], kind=kind, granularity="weight", progress=False,
                          impl="reference")
        scale = torch.cat([w.reshape(-1) for w in want.values()]).norm().item()
        for name, ls in r.items():
            for local, got in (("weight", ls.weight), ("bias", ls.bias)):
                if got is None:
                    continue
                w = want[f"{name}.{local}"]
                err = (got - w).norm().item() / max(w.norm().item(), scale)
                assert err <= F64_RTOL, f"seed {seed} {kind} {name}.{local}: {err:.2e}"
