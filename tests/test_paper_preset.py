"""OBAImportance.from_preset("paper"): the OBA authors' pipeline (issue 10 item 12), checked
against a group importance computed by hand from oba_ext.score on a small model."""
import pytest
import torch
from torch import nn

tp = pytest.importorskip("torch_pruning")

import oba_ext  # noqa: E402
from oba_ext.pruning import OBAImportance  # noqa: E402
from oba_ext.pruning.importance import PRESETS  # noqa: E402
from tolerances import FLOAT32_SAME_FORMULA_RTOL  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 4, 3)
        self.dead = nn.Conv2d(6, 2, 1)  # reads c1's channels but never reaches the loss
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.bn(self.c1(x)))
        return self.fc(torch.tanh(self.c2(h)).mean((2, 3))) + 0.0 * self.dead(h).mean()


def test_paper_preset_matches_hand_computed_group_importance():
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.bn.running_var.fill_(2.0)  # eval and train mode differ
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 3, (4,), generator=g))
               for _ in range(2)]
    imp = OBAImportance.from_preset("paper", batches, impl="reference", progress=False)
    assert (imp.kind, imp.eval_mode, imp.group_reduction, imp.normalizer) == \
        ("oba", False, "mean_nonzero", "max_eps")
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=batches[0][0])
    group = dg.get_pruning_group(model.c1, tp.prune_conv_out_channels, idxs=list(range(6)))
    got = imp(group)
    assert not model.training  # the mode is restored

    # by hand: train-mode oba scores; |c1.out| + |c2.in| + |dead.in| (all zero: not counted),
    # divided by the 2 layers with a non-zero score, then by max + 1e-6
    ref = oba_ext.score(model.train(), batches, kind="oba", impl="reference", progress=False)
    model.eval()
    assert bool((ref["dead"].inp == 0).all()) and ref["c2"].inp.abs().max() > 0
    total = ref["c1"].out.abs() + ref["c2"].inp.abs() + ref["dead"].inp.abs()
    mean = total / 2
    want = (mean / (mean.max() + 1e-6)).float()
    torch.testing.assert_close(got, want, rtol=FLOAT32_SAME_FORMULA_RTOL, atol=0)
    # Torch-Pruning's own mean divides by 3 and its "max" normalizer by max: another ranking scale
    plain = OBAImportance(batches=batches, eval_mode=False, normalizer="max", impl="reference")
    torch.testing.assert_close(plain(group), (total / 3 / (total / 3).max()).float(),
                               rtol=FLOAT32_SAME_FORMULA_RTOL,
                               atol=0)


def test_preset_overrides_and_unknown_name():
    b = [(torch.randn(2, 3, 4, 4), torch.tensor([0, 1]))]
    imp = OBAImportance.from_preset("paper", b, kind="taylor")
    assert imp.kind == "taylor" and imp.group_reduction == "mean_nonzero"
    assert set(PRESETS) == {"paper"}
    with pytest.raises(ValueError, match="preset"):
        OBAImportance.from_preset("nope", b)
