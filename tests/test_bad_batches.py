"""Bad data and set-up that used to surface as raw torch errors from deep inside the sweep:
each now raises an error that names the argument or module, or keeps torch's own error and
gains a note naming the batch, its shapes and dtypes (PEP 678 ``__notes__``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import oba_ext

IMPLS = ("kernel", "reference", "auto")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def _notes(e):
    return "\n".join(getattr(e.value, "__notes__", []))


@pytest.mark.parametrize("impl", IMPLS)
def test_label_batch_size_mismatch_is_torchs_error_with_the_batch_named(impl):
    x, y = torch.randn(6, 4), torch.arange(4) % 3
    with pytest.raises(ValueError, match=r"batch_size \(6\).*target batch_size \(4\)") as e:
        oba_ext.score(_mlp(), [(x, y)], impl=impl, progress=False)
    assert "oba_ext.score: while scoring batch 0: inputs (6, 4) float32; targets (4,) int64" \
        in _notes(e)
    with pytest.raises(ValueError, match="target batch_size") as e:
        oba_ext.hvp(_mlp(), [(x, y)], {}, impl=impl)
    assert "oba_ext.hvp: while scoring batch 0" in _notes(e)


@pytest.mark.parametrize("impl", IMPLS)
def test_float64_batch_on_float32_model_names_the_dtypes(impl):
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.arange(6) % 3
    ok = [(x, y)]
    with pytest.raises(RuntimeError, match="dtype") as e:
        oba_ext.score(_mlp(), [(torch.randn(6, 4), y), (x, y)], impl=impl, progress=False)
    note = _notes(e)
    assert "batch 1: inputs (6, 4) float64" in note and "model parameters float32" in note
    assert "pass dtype=" in note
    # and the advice works: a float64 copy of the model scores the float64 batch
    res = oba_ext.score(_mlp(), ok, impl=impl, dtype=torch.float64, progress=False)
    assert res["0"].out.dtype == torch.float64


@pytest.mark.parametrize("impl", IMPLS)
def test_uninitialized_lazy_module_is_named(impl):
    model = nn.Sequential(nn.LazyLinear(5), nn.ReLU(), nn.Linear(5, 3))
    with pytest.raises(ValueError, match=r"module '0' \(LazyLinear\) has uninitialized "
                                         r"parameters; run one forward pass"):
        oba_ext.score(model, [(torch.randn(6, 4), torch.arange(6) % 3)], impl=impl,
                      progress=False)
    with pytest.raises(ValueError, match=r"module '0' \(LazyLinear\)"):
        oba_ext.hvp(model, [(torch.randn(6, 4), torch.arange(6) % 3)], {}, progress=False)
    model(torch.randn(2, 4))  # materialized: it scores like any Linear
    res = oba_ext.score(model, [(torch.randn(6, 4), torch.arange(6) % 3)], impl=impl,
                        progress=False)
    assert res["0"].out.shape == (5,)


def test_unavailable_cuda_device_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    batches = [(torch.randn(6, 4), torch.arange(6) % 3)]
    with pytest.raises(ValueError, match=r"device: 'cuda:3' requested, but CUDA is not "
                                         r"available"):
        oba_ext.score(_mlp(), batches, device="cuda:3", progress=False)
    with pytest.raises(ValueError, match=r"device: 'cuda:3' requested"):
        oba_ext.hvp(_mlp(), batches, {}, device="cuda:3", progress=False)


def test_cuda_index_beyond_the_visible_devices_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"'cuda:3' requested, but this process sees 2 CUDA "
                                         r"device\(s\) \(cuda:0\.\.cuda:1"):
        oba_ext.score(_mlp(), [(torch.randn(6, 4), torch.arange(6) % 3)], device="cuda:3",
                      progress=False)
