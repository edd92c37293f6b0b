"""Equivalent Pruning (SPEC §6): identity compressors change nothing; pruned compressors equal
naive structured pruning (Torch-Pruning's dependency graph is the independent oracle); merging
after "fine-tuning" (random perturbation of every weight) keeps outputs (float32, ≤ 1e-5
relative) and gives the naive network's parameter count and FLOPs."""
from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.vision_transformer import MLPBlock

from oba_ext.pruning import equivalent as eq

from tolerances import F32_EQUAL_NETWORKS as RTOL32, F32_IDENTITY_INSERT, FLOAT64_RTOL


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def vgg_like():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))


def resnet_like():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         BasicBlock(8, 8), Bottleneck(8, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 5))


class TokenMLP(nn.Module):
    """torchvision's ViT MLPBlock on tokens (N, L, 8), then a Linear→GELU→Linear head."""

    def __init__(self):
        super().__init__()
        self.mlp = MLPBlock(8, 16, 0.0)
        self.head = nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 5))

    def forward(self, x):
        return self.head(self.mlp(x).mean(1))


CASES = {
    "vgg": (vgg_like, (2, 3, 8, 8), {"0": "4", "4": "7"}),
    "resnet": (resnet_like, (2, 3, 8, 8), {"3.conv1": "3.conv2", "4.conv1": "4.conv2",
                                           "4.conv2": "4.conv3"}),
    "mlp": (TokenMLP, (2, 4, 8), {"mlp.0": "mlp.3", "head.0": "head.2"}),
}


def make(case):
    build, shape, chains = CASES[case]
    torch.manual_seed(0)
    m = build()
    with torch.no_grad():  # non-trivial BN statistics
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.3, 0.3)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return m.eval(), torch.randn(*shape), chains


def random_keep(model, chains, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for ch in chains:
        k = max(1, ch.channels // 2 + int(torch.randint(0, 2, (1,), generator=g)))
        keep[ch.producer] = torch.randperm(ch.channels, generator=g)[:k].sort().values
    return keep


def naive_prune(model, x, keep):
    """Torch-Pruning removes the complement of ``keep`` from each producer's output channels
    (and everything its dependency graph couples to them)."""
    m = copy.deepcopy(model)
    dg = tp.DependencyGraph().build_dependency(m, example_inputs=x)
    for prod, idx in keep.items():
        mod = m.get_submodule(prod)
        fn = tp.prune_linear_out_channels if isinstance(mod, nn.Linear) else tp.prune_conv_out_channels
        drop = sorted(set(range(mod.weight.shape[0])) - set(idx.tolist()))
        dg.get_pruning_group(mod, fn, idxs=drop).prune()
    return m


def flops(model, x):
    with FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops()


def nparams(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("case", list(CASES))
def test_finds_the_expected_chains(case):
    m, _, want = make(case)
    got = {c.producer: c.consumer for c in eq.find_chains(m)}
    assert got == want


@pytest.mark.parametrize("case", list(CASES))
def test_insert_prune_merge_equals_naive_pruning(case):
    m, x, _ = make(case)
    ref_out = m(x)
    work = copy.deepcopy(m)
    chains = eq.insert_compressors(work)
    assert len(eq.compressor_names(work)) == len(chains)
    assert rel(work(x), ref_out) <= F32_IDENTITY_INSERT, "identity compressors must not change the outputs"

    keep = random_keep(work, chains)
    naive = naive_prune(m, x, keep)
    eq.prune_compressors(work, keep)
    err = rel(work(x), naive(x))
    assert err <= RTOL32, f"pruned compressors vs naive pruning: rel error {err:.2e}"

    # "fine-tune": perturb every parameter, compressors and decompressors included
    torch.manual_seed(1)
    with torch.no_grad():
        for p in work.parameters():
            p.add_(0.1 * torch.randn_like(p))
    before = work(x)
    merged = eq.merge_compressors(work)
    assert not any(isinstance(mod, eq.EquivalentWrapper) for mod in merged.modules())
    err = rel(merged(x), before)
    assert err <= RTOL32, f"merging changed the outputs: rel error {err:.2e}"
    assert nparams(merged) == nparams(naive)
    assert flops(merged, x) == flops(naive, x)
    assert [n for n, _ in merged.named_modules()] == [n for n, _ in naive.named_modules()]
    for (n, a), (_, b) in zip(merged.named_parameters(), naive.named_parameters()):
        assert a.shape == b.shape, f"{n}: {tuple(a.shape)} vs naive {tuple(b.shape)}"


@pytest.mark.parametrize("kind", ["jacobian", "magnitude_l1", "taylor"])
def test_select_keep_from_compressor_scores(kind):
    m, x, _ = make("resnet")
    eq.insert_compressors(m)
    y = torch.randint(0, 5, (x.shape[0],))
    res = eq.score_compressors(m, [(x, y)], kind=kind, impl="reference")
    assert set(res) == set(eq.compressor_names(m))
    keep = eq.select_keep(res, m, ratio=0.5)
    for prod, idx in keep.items():
        s = res[f"{prod}.compressor"].out.abs()
        rows = s.numel()
        assert idx.numel() == -(-rows // 2)
        dropped = sorted(set(range(rows)) - set(idx.tolist()))
        assert not dropped or s[idx].min() >= s[dropped].max(), "kept rows must score highest"
    eq.prune_compressors(m, keep)
    m(x)  # still runs after pruning


def test_compressor_scores_are_the_producer_filter_scores_at_identity():
    """At C = I the compressor row m carries exactly the producer's filter (incl. bias): its
    Taylor score equals the producer's output-channel Taylor score of the original network."""
    import oba_ext
    m, x, _ = make("vgg")
    m = m.double()
    x = x.double()
    y = torch.randint(0, 5, (x.shape[0],))
    orig = oba_ext.score(m, [(x, y)], kind="taylor", granularity="out", impl="reference",
                         progress=False)
    work = copy.deepcopy(m)
    eq.insert_compressors(work)
    comp = eq.score_compressors(work, [(x, y)], kind="taylor", impl="reference")
    for prod in ("0", "4"):
        a, b = comp[f"{prod}.compressor"].out, orig[prod].out
        assert rel(a, b) <= FLOAT64_RTOL, f"{prod}: {a} vs {b}"


def test_errors_name_the_argument():
    m, x, _ = make("vgg")
    eq.insert_compressors(m)
    with pytest.raises(ValueError, match="already holds compressors"):
        eq.insert_compressors(m)
    with pytest.raises(ValueError, match=r"keep\['0'\]"):
        eq.prune_compressors(m, {"0": torch.tensor([0, 0])})
    with pytest.raises(ValueError, match="not a producer"):
        eq.prune_compressors(m, {"7": torch.tensor([0])})
    with pytest.raises(ValueError, match="ratio"):
        eq.select_keep({}, m, ratio=1.0)


def test_global_ranking_drops_lowest_rows_overall_with_min_keep():
    m, _, _ = make("vgg")
    eq.insert_compressors(m)
    scores = {"0.compressor": torch.tensor([9., 8., 7., 6., 5., 4., 3., 2.]),
              "4.compressor": torch.tensor([-0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 10.])}
    keep = eq.select_keep(scores, m, ratio=0.5, global_ranking=True, min_keep=2)
    # 8 of 16 rows dropped: "4" may lose only 6 (min_keep=2; |−0.1| is its smallest), "0" loses 2
    assert keep["4"].tolist() == [6, 7]
    assert keep["0"].tolist() == [0, 1, 2, 3, 4, 5]


def test_select_keep_for_target_reaches_a_parameter_budget():
    m, x, _ = make("resnet")
    eq.insert_compressors(m)
    y = torch.randint(0, 5, (x.shape[0],))
    res = eq.score_compressors(m, [(x, y)], kind="magnitude_l1")
    base = nparams(eq.merge_compressors(copy.deepcopy(m)))
    keep = eq.select_keep_for_target(res, m, nparams, target=0.7)
    work = copy.deepcopy(m)
    eq.prune_compressors(work, keep)
    frac = nparams(eq.merge_compressors(work)) / base
    assert 0.55 < frac <= 0.7, f"kept {frac:.3f} of the parameters for a 0.7 target"


def test_cli_prune_equivalent_pruning_end_to_end(tmp_path):
    """``oba-ext prune --criterion jacobian --equivalent-pruning`` on the digits demo CNN: the
    merged model meets the MACs target and the report records the Equivalent Pruning run."""
    import json
    cli = pytest.importorskip("oba_ext.cli")
    out = tmp_path / "out"
    rc = cli.main(["prune", "--criterion", "jacobian", "--equivalent-pruning", "--model", "small_cnn",
                   "--dataset", "digits", "--flops-ratio", "0.6", "--num-batches", "1",
                   "--finetune-epochs", "0.05", "--impl", "reference", "--out", str(out),
                   "--no-progress"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    run = report["runs"]["jacobian"]
    assert run["equivalent_pruning"] and run["chains"]
    frac = run["macs_after"] / report["before"]["macs"]
    assert 0.5 < frac <= 0.6, f"MACs kept {frac:.3f} for a 0.6 target"
