"""Unstructured pruning: exact sparsity, which weights survive, permanence, clear errors."""
import pytest
import torch
from torch import nn

from oba_ext.pruning import apply_masks, prune_unstructured, sparsity_of, unstructured_masks


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 7),
                         nn.ReLU(), nn.Linear(7, 5)).eval()


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 5, (4,), generator=g))]


NAMES = ["0", "3", "5"]


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77, 0.9])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_exact_sparsity_and_lowest_scores_removed(sparsity, scope):
    model = _net()
    # scores with many ties (integers): the count must still be exact
    g = torch.Generator().manual_seed(2)
    scores = {n: torch.randint(-5, 6, dict(model.named_modules())[n].weight.shape, generator=g).float()
              for n in NAMES}
    masks = unstructured_masks(scores, model, sparsity, scope)
    sizes = {n: scores[n].numel() for n in NAMES}
    if scope == "global":
        total = sum(sizes.values())
        assert sum(int((m == 0).sum()) for m in masks.values()) == round(sparsity * total)
        kept = torch.cat([scores[n][masks[n].bool()].abs().flatten() for n in NAMES])
        gone = torch.cat([scores[n][~masks[n].bool()].abs().flatten() for n in NAMES])
    else:
        for n in NAMES:
            assert int((masks[n] == 0).sum()) == round(sparsity * sizes[n])
        kept = gone = None
    if kept is not None and gone.numel() and kept.numel():
        assert gone.max() <= kept.min()  # every removed |score| ≤ every kept |score|
    apply_masks(model, masks)
    if scope == "global":
        assert sparsity_of(model, NAMES) == pytest.approx(round(sparsity * total) / total, abs=0)


def test_oba_per_weight_scores_masks_permanent():
    model = _net()
    x = _batches()[0][0]
    masks, res = prune_unstructured(model, _batches(), 0.6, kind="oba", impl="reference",
                                    progress=False, permanent=True)
    total = sum(m.numel() for m in masks.values())
    zeros = sum(int((m == 0).sum()) for m in masks.values())
    assert zeros == round(0.6 * total)
    for n in NAMES:
        mod = dict(model.named_modules())[n]
        assert not hasattr(mod, "weight_orig") and isinstance(mod.weight, nn.Parameter)  # removed
        assert (mod.weight[masks[n] == 0] == 0).all() and (mod.weight[masks[n] == 1] != 0).all()
        # the highest-|score| weight of each layer survives
        top = res[n].weight.abs().flatten().argmax()
        assert masks[n].flatten()[top] == 1
    assert model(x).shape == (4, 5)


def test_non_permanent_masks_keep_originals():
    model = _net()
    w0 = model[0].weight.detach().clone()
    scores = {n: dict(model.named_modules())[n].weight.detach() for n in NAMES}
    masks = unstructured_masks(scores, model, 0.5, "layer")
    apply_masks(model, masks)
    assert hasattr(model[0], "weight_orig") and torch.equal(model[0].weight_orig, w0)
    assert torch.equal(model[0].weight, w0 * masks["0"])


def test_errors():
    model = _net()
    scores = {n: dict(model.named_modules())[n].weight.detach() for n in NAMES}
    with pytest.raises(ValueError, match="sparsity"):
        unstructured_masks(scores, model, 1.0)
    with pytest.raises(ValueError, match="scope"):
        unstructured_masks(scores, model, 0.5, scope="row")
    with pytest.raises(ValueError, match="shape"):
        unstructured_masks({"0": torch.ones(3)}, model, 0.5)
    with pytest.raises(ValueError, match="not a module"):
        unstructured_masks({"zz": torch.ones(3)}, model, 0.5)
    with pytest.raises(ValueError, match="granularity='weight'"):
        unstructured_masks({}, model, 0.5)
