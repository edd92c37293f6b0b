"""Checkpoint/resume of oba_ext.score: an interrupted run, resumed from its checkpoint, gives
scores identical (bitwise, float64 sums) to an uninterrupted run."""
import pytest
import torch
from torch import nn

import oba_ext


class Interrupted(RuntimeError):
    pass


class FailingBatches:
    """Yields the batches but raises after ``fail_after`` of them (a crash mid-run)."""

    def __init__(self, batches, fail_after):
        self.batches, self.fail_after = batches, fail_after

    def __iter__(self):
        for i, b in enumerate(self.batches):
            if i == self.fail_after:
                raise Interrupted(f"simulated crash before batch {i}")
            yield b


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double().eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(3, 2, 6, 6, generator=g, dtype=torch.float64),
                torch.randint(0, 3, (3,), generator=g)) for _ in range(5)]
    return model, batches


@pytest.mark.parametrize("every,fail_after", [(1, 3), (2, 3), (2, 4)])
def test_resume_gives_identical_scores(tmp_path, every, fail_after):
    model, batches = _setup()
    kw = dict(kind="oba", granularity=("out", "in", "weight"), impl="reference", progress=False)
    full = oba_ext.score(model, batches, **kw)
    ckpt = str(tmp_path / "score.ckpt")
    with pytest.raises(Interrupted):
        oba_ext.score(model, FailingBatches(batches, fail_after), checkpoint=ckpt,
                      checkpoint_every=every, **kw)
    saved = torch.load(ckpt, weights_only=False)
    assert saved["acc"]["num_batches"] == (fail_after // every) * every  # last full checkpoint
    resumed = oba_ext.score(model, batches, checkpoint=ckpt, checkpoint_every=every, **kw)
    assert resumed.num_batches == full.num_batches == 5
    for name in full:
        for key, t in full[name].tensors().items():
            assert torch.equal(resumed[name].tensors()[key], t), (name, key)


def test_checkpoint_for_another_run_is_refused(tmp_path):
    model, batches = _setup()
    ckpt = str(tmp_path / "score.ckpt")
    oba_ext.score(model, batches[:2], kind="taylor", impl="reference", progress=False, checkpoint=ckpt)
    with pytest.raises(ValueError, match="checkpoint"):
        oba_ext.score(model, batches, kind="oba", impl="reference", progress=False, checkpoint=ckpt)


def test_checkpoint_for_another_direction_or_other_weights_is_refused(tmp_path):
    """The fingerprint is of the values (sha256), not of a norm: a direction with some signs
    flipped (the same norm) or a model whose weights changed since the interruption is another
    run (a fresh-user probe resumed both silently before)."""
    model, batches = _setup()
    g = torch.Generator().manual_seed(2)
    v = {n: torch.randn(p.shape, generator=g, dtype=torch.float64)
         for n, p in model.named_parameters()}
    kw = dict(kind="exact", impl="reference", progress=False)
    ckpt = str(tmp_path / "dir.ckpt")
    oba_ext.score(model, batches[:2], direction=v, checkpoint=ckpt, **kw)
    flipped = {n: t.clone() for n, t in v.items()}
    flipped["0.weight"][0] *= -1
    assert torch.equal(flipped["0.weight"].square().sum(), v["0.weight"].square().sum())
    with pytest.raises(ValueError, match="checkpoint: .* different run"):
        oba_ext.score(model, batches, direction=flipped, checkpoint=ckpt, **kw)
    resumed = oba_ext.score(model, batches, direction=v, checkpoint=ckpt, **kw)  # same run: ok
    assert resumed.num_batches == len(batches)
    ckpt2 = str(tmp_path / "w.ckpt")
    oba_ext.score(model, batches[:2], kind="oba", impl="reference", progress=False,
                  checkpoint=ckpt2)
    with torch.no_grad():
        model[3].weight.mul_(2.0)
    with pytest.raises(ValueError, match="checkpoint: .* different run"):
        oba_ext.score(model, batches, kind="oba", impl="reference", progress=False,
                      checkpoint=ckpt2)
