"""Regression tests from a new user's attempts to break the library (silent wrong numbers found
after the edge-model work): module hooks and grad-mode switches inside ``forward`` (fx drops
both, so the engine must refuse and ``auto`` falls back to the reference path, which honours
them), and reparametrized weights on the reference path (it substitutes θ, which a
parametrization or the old weight_norm pre-hook overwrites: refused by name, never zeros).
Right values: θ⊙∇L from plain autograd, float64."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import oba_ext
from tolerances import assert_close_rel


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2])


def _taylor_truth(m, layer, x, y):
    m.zero_grad()
    F.cross_entropy(m(x), y).backward()
    w = dict(m.named_modules())[layer].weight
    return (w * w.grad).detach()


class StopGrad(nn.Module):
    def __init__(self, switch):
        super().__init__()
        self.a, self.b, self.switch = nn.Linear(4, 4), nn.Linear(4, 3), switch

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.switch == "no_grad":
            with torch.no_grad():
                sc = h.norm(dim=1, keepdim=True)
        else:
            torch.set_grad_enabled(False)
            sc = h.norm(dim=1, keepdim=True)
            torch.set_grad_enabled(True)
        return self.b(h / sc)


def _hooked(where):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    if where == "target":
        m[0].register_forward_hook(lambda mod, inp, out: 3 * out)
    elif where == "activation":
        m[1].register_forward_hook(lambda mod, inp, out: out * out)
    elif where == "root_pre":
        m.register_forward_pre_hook(lambda mod, inp: (2 * inp[0],))
    else:  # an instance-level forward override (how some wrappers patch models)
        m[0].forward = lambda x, lin=m[0]: F.linear(x, lin.weight, lin.bias) ** 2
    return m


@pytest.mark.parametrize("case", ["target", "activation", "root_pre", "instance_forward",
                                  "no_grad", "set_grad_enabled"])
def test_hooks_and_grad_mode_are_refused_by_the_engine_and_honoured_by_auto(case):
    torch.manual_seed(0)
    m = StopGrad(case).double() if case in ("no_grad", "set_grad_enabled") else _hooked(case)
    layer = "a" if case in ("no_grad", "set_grad_enabled") else "0"
    x, y = _data()
    truth = _taylor_truth(m, layer, x, y)
    with pytest.raises(RuntimeError, match="cannot be captured: .*(hooks|forward is replaced|"
                                           "switches gradients off)"):
        oba_ext.score(m, [(x, y)], kind="taylor", granularity="weight", impl="kernel",
                      progress=False)
    with pytest.warns(UserWarning, match="falling back to the reference path"):
        res = oba_ext.score(m, [(x, y)], kind="taylor", granularity="weight", impl="auto",
                            progress=False)
    assert res.impl == "reference"
    assert_close_rel(res[layer].weight, truth, f"{case}: taylor = θ⊙∇L")


def test_grad_mode_refusal_names_the_users_line():
    m = StopGrad("no_grad").double()
    x, y = _data()
    with pytest.raises(RuntimeError, match=r"test_user_reports\.py:\d+"):
        oba_ext.score(m, [(x, y)], kind="oba", impl="kernel", progress=False)
    assert torch.is_grad_enabled()


def test_reparametrized_weights_refused_on_the_reference_path_scored_on_the_engine():
    from torch.nn.utils.parametrizations import weight_norm
    torch.manual_seed(0)
    m = nn.Sequential(weight_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = _data()
    w = m[0].weight.detach()  # the effective weight g·v/‖v‖ is θ
    with pytest.raises(ValueError, match=r"layer '0' .*reparametrized"):
        oba_ext.score(m, [(x, y)], kind="taylor", granularity="weight", impl="reference",
                      progress=False)
    res = oba_ext.score(m, [(x, y)], kind="taylor", granularity="weight", impl="auto",
                        progress=False)
    assert res.impl == "kernel"
    # θ⊙∇_θ L at the effective weight θ = W(g, v): perturb θ directly through a plain copy
    plain = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        plain[0].weight.copy_(w)
        plain[0].bias.copy_(m[0].bias)
        plain[2].load_state_dict(m[2].state_dict())
    truth = _taylor_truth(plain, "0", x, y)
    assert_close_rel(res["0"].weight, truth, "weight_norm: taylor at the effective weight")


def test_old_weight_norm_hook_is_refused_by_name_on_every_path():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates nn.utils.weight_norm
        m = nn.Sequential(nn.utils.weight_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 3))
    m = m.double()
    x, y = _data()
    for impl in ("auto", "reference"):
        with pytest.raises(ValueError, match=r"layer '0' .*forward pre-hooks \(WeightNorm\)"), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            oba_ext.score(m, [(x, y)], kind="taylor", impl=impl, progress=False)
    with pytest.raises(RuntimeError, match="has hooks"):
        oba_ext.score(m, [(x, y)], kind="taylor", impl="kernel", progress=False)


def test_runtime_refusal_under_auto_falls_back_for_the_remaining_batches():
    """nn.MultiheadAttention's attention weights feeding the loss are found only while scoring:
    "auto" warns and finishes on the reference path (same numbers), "kernel" raises by name."""
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.att, self.o = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

        def forward(self, x):
            y, w = self.att(x, x, x, need_weights=True, average_attn_weights=False)
            return self.o(y.mean(1)) + w.sum((1, 2))[:, :3]

    m = M().double()
    g = torch.Generator().manual_seed(1)
    b = [(torch.randn(2, 4, 8, generator=g, dtype=torch.float64), torch.tensor([0, 2]))
         for _ in range(2)]
    with pytest.warns(UserWarning, match="attention weights .* feed the loss.*falling back to "
                                         "the reference path from batch 0"):
        got = oba_ext.score(m, b, kind="oba", progress=False)
    want = oba_ext.score(m, b, kind="oba", impl="reference", progress=False)
    assert got.impl == "reference" and set(got) == set(want)
    for name in want:
        for key, t in want[name].tensors().items():
            assert_close_rel(got[name].tensors()[key], t, f"{name}.{key}")
    with pytest.raises(RuntimeError, match="impl='kernel': att: the attention weights"):
        oba_ext.score(m, b, kind="oba", impl="kernel", progress=False)


def test_unscored_weighted_modules_and_headless_models_are_named():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv3d(2, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(3, 3)).double()
    x = torch.randn(2, 2, 2, 2, 2, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"not target layers are held fixed and not scored: "
                                         r"0 \(Conv3d\)"):
        res = oba_ext.score(m, [(x, torch.tensor([0, 1]))], progress=False)
    assert list(res) == ["3"]
    mlp = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with pytest.warns(UserWarning, match="has no attention module .* no head scores"):
        res = oba_ext.score(mlp, [_data()], granularity="head", progress=False)
    assert all(not ls.tensors() for ls in res.values())
