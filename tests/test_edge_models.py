"""Models users bring that sit at the edges of the engine (issue 10 items 1, 2, 3, 6, 11; SPEC §8):
custom autograd Functions, wrapped models, masked (torch.nn.utils.prune) models, empty batches
and research-code forward()s. Every number is compared in float64 with brute force (full
Hessians by reverse-over-reverse autograd, which runs the Functions' own backward) or with the
reference path on an equivalent plain model, on impl "auto", "reference" and "kernel"."""
import copy
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import oba_ext
from oba_ext.engine import CaptureError
from oba_ext.pruning import apply_masks, unstructured_masks
from oba_ext.pruning.unstructured import refresh_masked_weights
from oba_ext.reference.functions import UnsupportedFunctionError
from oba_ext.targets import target_parameters
from tolerances import assert_close_rel

IMPLS = ("auto", "reference", "kernel")
D = torch.float64


# ------------------------------------------------------------------ brute force (plain autograd)
_BRUTE = {}


def _brute(model, x, y, loss=F.cross_entropy, key=None):
    """Cached by ``key`` (the same model and batch under several impls)."""
    if key is not None and key in _BRUTE:
        return _BRUTE[key]
    out = _brute_uncached(model, x, y, loss)
    if key is not None:
        _BRUTE[key] = out
    return out


def _brute_uncached(model, x, y, loss=F.cross_entropy):
    """``{name: θ⊙∇L}``, ``{name: θ⊙Hθ}``, ``{name: θ⊙(H − GGN)θ}`` over the target parameters.
    Full matrices by ``torch.autograd.functional`` (loops of plain backward passes, so custom
    Functions run their own backward; torch.func would need functorch support from them).
    ``H − GGN`` is OBA's Ĥ when every non-product op is piecewise linear (SPEC §2)."""
    tp = {n: p.detach() for n, p in target_parameters(oba_ext.find_layers(model)).items()}
    names = list(tp)
    shapes = [tp[n].shape for n in names]
    v0 = torch.cat([tp[n].reshape(-1) for n in names])

    def unflat(v):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            out[n] = v[i:i + s.numel()].reshape(s)
            i += s.numel()
        return out

    def f(v):
        return torch.func.functional_call(model, unflat(v), (x,))

    g = torch.autograd.functional.jacobian(lambda v: loss(f(v), y), v0)
    H = torch.autograd.functional.hessian(lambda v: loss(f(v), y), v0)
    J = torch.autograd.functional.jacobian(f, v0).reshape(-1, v0.numel())
    z0 = f(v0).detach()
    Hl = torch.autograd.functional.hessian(lambda z: loss(z, y), z0).reshape(z0.numel(), -1)
    taylor = {n: tp[n] * t for n, t in unflat(g).items()}
    exact = {n: tp[n] * t for n, t in unflat(H @ v0).items()}
    oba = {n: tp[n] * t for n, t in unflat((H - J.T @ Hl @ J) @ v0).items()}
    return {"taylor": taylor, "exact": exact, "oba": oba}


def _batches(n_in=4, n_out=3, n=6, seed=1, shape=None):
    g = torch.Generator().manual_seed(seed)
    shape = shape or (n, n_in)
    return [(torch.randn(*shape, generator=g, dtype=D), torch.randint(0, n_out, (shape[0],), generator=g))]


def _score(model, batches, kind, impl, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return oba_ext.score(model, batches, kind=kind, impl=impl, progress=False,
                             granularity=kw.pop("granularity", ("weight",)), **kw)


# ------------------------------------------------------------------ 1. custom autograd Functions
class STE(torch.autograd.Function):
    """Straight-through quantizer: forward round(4x)/4, backward (and jvp) identity."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(4 * x) / 4

    @staticmethod
    def backward(ctx, g):
        return g

    @staticmethod
    def jvp(ctx, t):
        return t


class STENoJvp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(4 * x) / 4

    @staticmethod
    def backward(ctx, g):
        return g


class Swish(torch.autograd.Function):
    """x·σ(x) with a hand-written (differentiable) backward and jvp, and a scale argument."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        ctx.scale = scale
        return scale * x * torch.sigmoid(x)

    @staticmethod
    def _d(x):
        s = torch.sigmoid(x)
        return s + x * s * (1 - s)

    @staticmethod
    def backward(ctx, g):
        x, = ctx.saved_tensors
        return ctx.scale * g * Swish._d(x), None

    @staticmethod
    def jvp(ctx, t, _):
        x, = ctx.saved_tensors
        return ctx.scale * t * Swish._d(x)


class OnceSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        return x * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, = ctx.saved_tensors
        return 2 * x * g

    @staticmethod
    def jvp(ctx, t):
        x, = ctx.saved_tensors
        return 2 * x * t


class DetachedSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        x, = ctx.saved_tensors
        return (2 * x * g).detach()


class FnMLP(nn.Module):
    def __init__(self, fn, act=nn.ReLU(), *fn_args):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 6), act, nn.Linear(6, 3)
        self.fn, self.fn_args = fn, fn_args

    def forward(self, x):
        return self.fc2(self.fn.apply(self.act(self.fc1(x)), *self.fn_args))


def _fn_model(fn, *args, act=None):
    torch.manual_seed(0)
    return FnMLP(fn, act if act is not None else nn.ReLU(), *args).to(D).eval()


@pytest.mark.parametrize("impl", IMPLS)
def test_ste_function_uses_its_backward_and_jvp(impl):
    """The quantizer's backward is the identity: taylor of the layer below is what
    loss.backward() gives (not 0); oba/exact from brute force (ReLU + STE: Ĥ = H − GGN)."""
    model, batches = _fn_model(STE), _batches()
    brute = _brute(model, *batches[0], key="STE")
    assert brute["taylor"]["fc1.weight"].abs().max() > 0
    for kind in ("taylor", "oba", "exact"):
        res = _score(model, batches, kind, impl)
        assert res.impl == ("reference" if impl == "reference" else "kernel")
        for name in ("fc1", "fc2"):
            assert_close_rel(res[name].weight, brute[kind][f"{name}.weight"], f"{kind} {name} [{impl}]")


@pytest.mark.parametrize("impl", IMPLS)
def test_smooth_function_with_arguments(impl):
    """A smooth Function (own backward and jvp, a float argument): exact against the full
    Hessian; oba against the reference path (the Φ-oracle) on the same model."""
    model, batches = _fn_model(Swish, 0.7, act=nn.Identity()), _batches()
    brute = _brute(model, *batches[0], key="Swish")
    ref = _score(model, batches, "oba", "reference")
    for kind in ("taylor", "exact", "oba"):
        res = _score(model, batches, kind, impl)
        for name in ("fc1", "fc2"):
            want = ref[name].weight if kind == "oba" else brute[kind][f"{name}.weight"]
            assert_close_rel(res[name].weight, want, f"{kind} {name} [{impl}]")


@pytest.mark.parametrize("impl", IMPLS)
def test_function_without_jvp(impl):
    """No jvp: oba (forward tangents) is refused by name on every path; exact (double backward
    through its backward) and taylor are right."""
    model, batches = _fn_model(STENoJvp), _batches()
    with pytest.raises(UnsupportedFunctionError, match=r"STENoJvp has no jvp"):
        _score(model, batches, "oba", impl)
    brute = _brute(model, *batches[0], key="STENoJvp")
    for kind in ("taylor", "exact"):
        res = _score(model, batches, kind, impl)
        assert_close_rel(res["fc1"].weight, brute[kind]["fc1.weight"], f"{kind} [{impl}]")


@pytest.mark.parametrize("fn, why", [(OnceSquare, "once_differentiable"),
                                     (DetachedSquare, "not on the autograd graph")])
@pytest.mark.parametrize("impl", IMPLS)
def test_function_without_double_backward(impl, fn, why):
    """exact needs a differentiable backward: refused by name (no silent zero curvature);
    taylor still right."""
    model, batches = _fn_model(fn, act=nn.Tanh()), _batches()
    with pytest.raises(UnsupportedFunctionError, match=rf"{fn.__name__}.*{why}"):
        _score(model, batches, "exact", impl)
    brute = _brute(model, *batches[0], key=fn.__name__)
    res = _score(model, batches, "taylor", impl)
    assert_close_rel(res["fc1"].weight, brute["taylor"]["fc1.weight"], f"taylor [{impl}]")
    if fn is OnceSquare:  # has a jvp: oba needs no double backward
        ref = _score(model, batches, "oba", "reference")
        assert_close_rel(_score(model, batches, "oba", impl)["fc1"].weight, ref["fc1"].weight,
                         f"oba [{impl}]")


class Split(torch.autograd.Function):
    """New-style Function (setup_context), two outputs, a non-tensor argument."""

    @staticmethod
    def forward(x, s):
        return x * s, torch.relu(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, s = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        ctx.s = s

    @staticmethod
    def backward(ctx, g1, g2):
        x, = ctx.saved_tensors
        return g1 * ctx.s + g2 * (x > 0).to(x.dtype), None

    @staticmethod
    def jvp(ctx, t, _):
        x, = ctx.saved_tensors
        return t * ctx.s, t * (x > 0).to(x.dtype)


class SplitNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x):
        p, q = Split.apply(self.a(x), 0.5)
        return self.b(torch.relu(p)) + self.c(q)


@pytest.mark.parametrize("impl", IMPLS)
def test_new_style_function_with_two_outputs(impl):
    torch.manual_seed(0)
    model, batches = SplitNet().to(D), _batches()
    brute = _brute(model, *batches[0], key="Split")  # piecewise linear: Ĥ = H − GGN
    for kind in ("taylor", "oba", "exact"):
        res = _score(model, batches, kind, impl)
        for n in ("a", "b", "c"):
            assert_close_rel(res[n].weight, brute[kind][f"{n}.weight"], f"{kind} {n} [{impl}]")


def test_function_is_one_engine_node():
    from oba_ext.engine.capture import capture
    from oba_ext.engine.rules.function import FunctionApply
    model = _fn_model(STE)
    prog = capture(model, oba_ext.find_layers(model))
    fns = [st.fn for st in prog.steps if isinstance(st.fn, FunctionApply)]
    assert [f.cls for f in fns] == [STE]
    assert not any(st.fn is torch.round for st in prog.steps)


# ------------------------------------------------------------------ 2. wrapped models
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(D).eval()


@pytest.mark.parametrize("wrap", ["compile", "dataparallel"])
@pytest.mark.parametrize("impl", IMPLS)
def test_wrapped_models_score_the_inner_module(impl, wrap):
    model, batches = _mlp(), _batches()
    wrapped = torch.compile(model) if wrap == "compile" else nn.DataParallel(model)
    prefix = "_orig_mod" if wrap == "compile" else "module"
    for kind in ("oba", "exact", "taylor"):
        want = _score(model, batches, kind, "reference", granularity=("weight", "out"))
        got = _score(wrapped, batches, kind, impl, granularity=("weight", "out"))
        assert sorted(got) == ["0", "2"]  # the inner module's names
        for n in ("0", "2"):
            assert_close_rel(got[n].weight, want[n].weight, f"{wrap} {kind} {n} [{impl}]")
            assert_close_rel(got[n].out, want[n].out, f"{wrap} {kind} {n}.out [{impl}]")
    # targets/ignore may name layers through the wrapper
    got = _score(wrapped, batches, "oba", impl, targets=[f"{prefix}.2"])
    assert list(got) == ["2"]


@pytest.mark.parametrize("impl", IMPLS)
def test_compiled_submodule(impl):
    """``block = torch.compile(block)`` inside a model: scored eagerly, names keep _orig_mod."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Sequential(nn.Tanh(), nn.Linear(6, 3))).to(D)
    compiled = copy.deepcopy(model)
    compiled[1] = torch.compile(compiled[1])
    batches = _batches()
    for kind in ("oba", "exact"):
        want = _score(model, batches, kind, "reference")
        got = _score(compiled, batches, kind, impl)
        assert got.impl == ("reference" if impl == "reference" else "kernel")
        assert sorted(got) == ["0", "1._orig_mod.1"]
        assert_close_rel(got["0"].weight, want["0"].weight, f"{kind} 0 [{impl}]")
        assert_close_rel(got["1._orig_mod.1"].weight, want["1.1"].weight, f"{kind} 1.1 [{impl}]")


# ------------------------------------------------------------------ 3. masked models
def _masked(seed=3):
    model = _mlp()
    g = torch.Generator().manual_seed(seed)
    masks = {"0": (torch.rand(6, 4, generator=g) > 0.5).to(D),
             "2": (torch.rand(3, 6, generator=g) > 0.5).to(D)}
    masked = apply_masks(copy.deepcopy(model), masks, permanent=False)
    return masked, masks


def _plain_equivalent(masked):
    """The same function with the effective weights as plain parameters."""
    plain = _mlp()
    with torch.no_grad():
        for n in ("0", "2"):
            plain[int(n)].weight.copy_(masked[int(n)].weight_orig * masked[int(n)].weight_mask)
            plain[int(n)].bias.copy_(masked[int(n)].bias)
    return plain


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_model_scores_its_effective_weights(impl):
    masked, masks = _masked()
    with torch.no_grad():  # weight_orig changed after the last forward: the hook's weight is stale
        masked[0].weight_orig.mul_(1.5)
    plain, batches = _plain_equivalent(masked), _batches()
    brute = _brute(plain, *batches[0], key="masked")
    for kind in ("taylor", "oba", "exact"):
        got = _score(masked, batches, kind, impl, granularity=("weight", "out", "in"))
        ref = _score(plain, batches, kind, "reference", granularity=("weight", "out", "in"))
        for n in ("0", "2"):
            w = got[n].weight
            assert (w[masks[n] == 0] == 0).all(), f"{kind} {n}: masked entries must score 0"
            want = ref[n].weight if kind == "oba" else brute[kind][f"{n}.weight"]  # tanh: Ĥ ≠ H − GGN
            assert_close_rel(w, want, f"{kind} {n} [{impl}]")
            assert_close_rel(got[n].out, ref[n].out, f"{kind} {n}.out [{impl}]")
            assert_close_rel(got[n].inp, ref[n].inp, f"{kind} {n}.in [{impl}]")
    # the model is as before: hooks, weight_orig, no grads
    assert len(masked[0]._forward_pre_hooks) == 1 and masked[0].weight_orig.grad is None
    out = masked(batches[0][0])  # the pruning hook still masks
    assert torch.equal(out, plain(batches[0][0]))


def test_masked_model_scored_in_another_dtype():
    masked, masks = _masked()
    masked32 = copy.deepcopy(refresh_masked_weights(masked)).float()
    masked32(torch.zeros(1, 4))  # the hook recomputes weight in float32
    res = _score(masked32, _batches(), "oba", "auto", dtype=D)
    ref = _score(_plain_equivalent(masked), _batches(), "oba", "reference")
    assert res["0"].weight.dtype == D
    # float32 parameters -> float64 copy: compared with the float64 model rounded the same way
    plain = _plain_equivalent(masked).float().double()
    ref = _score(plain, _batches(), "oba", "reference")
    assert_close_rel(res["0"].weight, ref["0"].weight, "oba float32 masked scored in float64")


@pytest.mark.parametrize("impl", IMPLS)
def test_iterative_unstructured_pruning_second_round(impl):
    """Round 2 keeps round 1's zeros and removes the lowest-|score| survivors (by the masked
    model's effective-weight scores), not survivors in index order."""
    model, batches = _mlp(), _batches(n=16)
    r1 = _score(model, batches, "oba", impl)
    masks1 = unstructured_masks(r1, model, 0.5)
    apply_masks(model, masks1, permanent=False)
    r2 = _score(model, batches, "oba", impl)
    ref2 = _score(_plain_equivalent(model), batches, "oba", "reference")
    masks2 = unstructured_masks(r2, model, 0.75)
    total = sum(m.numel() for m in masks2.values())
    assert sum(int((m == 0).sum()) for m in masks2.values()) == round(0.75 * total)
    flat1 = torch.cat([masks1[n].flatten() for n in ("0", "2")])
    flat2 = torch.cat([masks2[n].flatten() for n in ("0", "2")])
    assert not ((flat1 == 0) & (flat2 == 1)).any(), "round 2 revived a masked weight"
    s2 = torch.cat([ref2[n].weight.flatten() for n in ("0", "2")]).abs()
    survivors = (flat1 == 1).nonzero().flatten()
    assert (s2[survivors] > 0).all()
    k = int((flat2 == 0).sum() - (flat1 == 0).sum())
    want = survivors[torch.sort(s2[survivors], stable=True).indices[:k]]
    got = ((flat1 == 1) & (flat2 == 0)).nonzero().flatten()
    assert sorted(got.tolist()) == sorted(want.tolist())
    assert sorted(got.tolist()) != survivors[:k].tolist()  # not index order


# ------------------------------------------------------------------ 6. empty batches
@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch_is_refused_by_index(impl):
    model, batches = _mlp(), _batches() + _batches(n=0, seed=2) + _batches(seed=3)
    with pytest.raises(ValueError, match=r"batch 1 is empty"):
        _score(model, batches, "oba", impl)


# ------------------------------------------------------------------ 11. research-code models
class ResearchVGG(nn.Module):
    """Like the OBA authors' VGG: a pooling module built inside forward, and a defaulted flag
    that forward branches on."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x, return_features=False, scale=None):
        x = F.relu(self.conv1(x))
        x = nn.AvgPool2d(2)(x)
        x = F.relu(self.conv2(x))
        feats = nn.AdaptiveAvgPool2d(1)(x).flatten(1)
        if scale is not None:
            feats = feats * scale
        if return_features:
            return feats
        return self.fc(feats)


@pytest.mark.parametrize("impl", IMPLS)
def test_research_code_is_captured(impl):
    torch.manual_seed(0)
    model = ResearchVGG().to(D).eval()
    batches = _batches(shape=(3, 2, 6, 6))
    for kind in ("oba", "exact"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no fallback warning
            warnings.filterwarnings("ignore", message=".*no rule for.*")
            got = oba_ext.score(model, batches, kind=kind, impl=impl, progress=False,
                                granularity=("weight", "out"))
        assert got.impl == ("reference" if impl == "reference" else "kernel")
        ref = _score(model, batches, kind, "reference", granularity=("weight", "out"))
        for n in ("conv1", "conv2", "fc"):
            assert_close_rel(got[n].weight, ref[n].weight, f"{kind} {n} [{impl}]")


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        if h.sum() > 0:  # data-dependent control flow: not capturable
            h = h * 2
        return self.fc2(h)


_LINE = inspect.getsourcelines(DataDependent.forward)[1] + 2


def test_capture_failure_names_the_users_line():
    torch.manual_seed(0)
    model, batches = DataDependent().to(D), _batches()
    where = f"{__file__}:{_LINE}"
    with pytest.warns(UserWarning, match="falling back") as rec:
        res = oba_ext.score(model, batches, impl="auto", progress=False)
    assert res.impl == "reference"
    msg = " ".join(str(w.message) for w in rec if "falling back" in str(w.message))
    assert where in msg and "h.sum() > 0" in msg
    with pytest.raises(RuntimeError, match=rf"{_LINE} in forward"):
        oba_ext.score(model, batches, impl="kernel", progress=False)


def test_module_with_parameters_created_in_forward_is_refused():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return nn.Linear(3, 3, dtype=torch.float64)(self.fc(x))

    from oba_ext.engine.capture import capture
    model = Bad().to(D)
    with pytest.raises(CaptureError, match=r"Linear module created inside forward"):
        capture(model, oba_ext.find_layers(model))


# ------------------------------------------------------------------ NaN check: one sync per batch
def test_nan_check_one_host_sync_per_batch(monkeypatch):
    from oba_ext import scoring
    vals = {f"l{i}": {k: torch.randn(5, dtype=D) for k in ("out", "in", "weight")} for i in range(6)}
    calls = []
    orig = torch.Tensor.__bool__

    def counting(self):
        calls.append(1)
        return orig(self)
    monkeypatch.setattr(torch.Tensor, "__bool__", counting)
    scoring._check_finite(vals, 0)
    assert len(calls) == 1
    vals["l4"]["in"][2] = float("nan")
    monkeypatch.setattr(torch.Tensor, "__bool__", orig)
    with pytest.raises(FloatingPointError, match=r"NaN in the 'in' score of layer 'l4' at batch 7"):
        scoring._check_finite(vals, 7)
