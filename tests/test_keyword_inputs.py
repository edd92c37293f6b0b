"""Issue 10 item 7: a batch's inputs may be a tensor, a tuple of positional tensors or a dict of
keyword tensors (``model(**inputs)``, the Hugging Face calling convention), on every path.

Right values: the same model scored with positional inputs (the path every other test covers)
and, across paths, the reference oracles in float64 (≤ FLOAT64_RTOL per tensor)."""
from __future__ import annotations

import warnings
from collections import UserDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import oba_ext
from oba_ext.inputs import batch_size, call_args
from tolerances import assert_matches


class TwoInput(nn.Module):
    """forward(x, mask): a masked MLP with a second, keyword-style input."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x, mask):
        return self.fc2(torch.tanh(self.fc1(x)) * mask)


def _batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(4, 5, generator=g, dtype=torch.float64)
        mask = (torch.rand(4, 7, generator=g) > 0.3).double()
        y = torch.randint(0, 3, (4,), generator=g)
        out.append((x, mask, y))
    return out


def _model():
    torch.manual_seed(0)
    return TwoInput().double().eval()


def _score(model, batches, **kw):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = oba_ext.score(model, batches, progress=False, **kw)
    ours = [str(x.message) for x in w if "oba_ext" in str(x.message)]
    assert not ours, ours  # no fallback or rule warning: the engine takes keyword inputs
    return res


def _same(a, b, what):
    assert set(a) == set(b), what
    for name in a:
        for f in ("out", "inp", "weight", "bias"):
            x, y = getattr(a[name], f), getattr(b[name], f)
            assert (x is None) == (y is None), f"{what}: {name}.{f}"
            if x is not None:
                assert_matches(x, y, what=f"{what}: {name}.{f}")


@pytest.mark.parametrize("kind", ["oba", "exact", "taylor"])
def test_dict_tuple_and_paths_agree(kind):
    model = _model()
    data = _batches()
    pos = [((x, m), y) for x, m, y in data]
    kwd = [({"mask": m, "x": x}, y) for x, m, y in data]  # out of order on purpose
    gran = ("out", "in", "weight")
    ref_pos = _score(model, pos, kind=kind, impl="reference", granularity=gran)
    ref_kw = _score(model, kwd, kind=kind, impl="reference", granularity=gran)
    ker_kw = _score(model, kwd, kind=kind, impl="kernel", granularity=gran)
    auto_kw = _score(model, kwd, kind=kind, impl="auto", granularity=gran)
    assert ker_kw.impl == "kernel" and auto_kw.impl == "kernel" and ref_kw.impl == "reference"
    assert ref_pos["fc1"].out.abs().max() > 0
    _same(ref_kw, ref_pos, "reference dict vs tuple")
    _same(ker_kw, ref_pos, "kernel dict vs reference")
    _same(auto_kw, ref_pos, "auto dict vs reference")


def test_mixed_positional_and_keyword_via_defaults():
    """A dict may leave out parameters that have defaults; the tensor form still works."""
    class WithDefault(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x, scale=2.0):
            return self.fc(x) * scale

    torch.manual_seed(0)
    model = WithDefault().double()
    x, _, y = _batches(1)[0]
    a = _score(model, [({"x": x}, y)], kind="exact", impl="kernel")
    b = _score(model, [(x, y)], kind="exact", impl="reference")
    _same(a, b, "dict with a defaulted parameter left out")


def test_mapping_inputs_are_moved_and_cast():
    """A Mapping that is not a dict (Hugging Face's BatchEncoding is a UserDict) is moved and
    cast with dtype= like any batch; integer tensors keep their dtype."""
    torch.manual_seed(0)
    model = TwoInput()  # float32; scored as a float64 copy
    x, m, y = _batches(1)[0]
    batch = (UserDict({"x": x.float(), "mask": m.float()}), y)
    a = _score(model, [batch], kind="oba", impl="kernel", dtype=torch.float64)
    b = _score(model.double(), [((x.float().double(), m), y)], kind="oba", impl="reference")
    _same(a, b, "UserDict inputs, dtype=float64")


def test_fisher_per_sample_with_keyword_inputs():
    """The per-sample criterion (fisher) vmaps over keyword inputs and takes the batch size
    from the first tensor."""
    model = _model()
    data = _batches()
    a = oba_ext.score(model, [({"x": x, "mask": m}, y) for x, m, y in data], kind="fisher",
                      progress=False)
    b = oba_ext.score(model, [((x, m), y) for x, m, y in data], kind="fisher", progress=False)
    assert a["fc1"].out.abs().max() > 0
    _same(a, b, "fisher dict vs tuple")


def test_keyword_errors_name_the_input():
    model = _model()
    x, m, y = _batches(1)[0]
    with pytest.raises(ValueError, match="'maks' is not a parameter"):
        oba_ext.score(model, [({"x": x, "maks": m}, y)], impl="kernel", progress=False)
    with pytest.raises(ValueError, match="missing input 'mask'"):
        oba_ext.score(model, [({"x": x}, y)], impl="kernel", progress=False)
    with pytest.raises(TypeError, match="maks"):
        oba_ext.score(model, [({"x": x, "maks": m}, y)], impl="reference", progress=False)
    with pytest.raises(TypeError, match="string keys"):
        oba_ext.score(model, [({0: x}, y)], impl="reference", progress=False)


def test_inputs_helpers():
    x = torch.zeros(3, 2)
    assert call_args(x) == ((x,), {})
    assert call_args((x, 1)) == ((x, 1), {})
    assert call_args({"a": x}) == ((), {"a": x})
    assert batch_size({"ids": torch.zeros(5, 2, dtype=torch.long), "m": x}) == 5
    with pytest.raises(ValueError, match="batch dimension"):
        batch_size({"flag": True})


def test_default_loss_takes_logits_field():
    """The default cross-entropy accepts an output object with a ``logits`` tensor (a Hugging
    Face ModelOutput) and refuses other non-tensor outputs by name."""
    from oba_ext.scoring import default_loss

    class Out:
        def __init__(self, logits):
            self.logits = logits
    z, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    assert torch.equal(default_loss(Out(z), y), F.cross_entropy(z, y))
    with pytest.raises(TypeError, match="loss_fn"):
        default_loss({"a": z}, y)
