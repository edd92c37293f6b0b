"""``oba-ext``: score, prune and demo from the command line (``python -m oba_ext.cli``).

Examples::

    oba-ext demo                                   # digits CNN: oba vs taylor vs magnitude, 50% FLOPs
    oba-ext score --model resnet56 --dataset cifar10 --data-root ~/data --weights r56.pt
    oba-ext prune --model resnet56 --dataset cifar10 --data-root ~/data --weights r56.pt \\
        --flops-ratio 0.5 --criteria oba taylor --finetune-epochs 10
    torchrun --nproc-per-node 2 -m oba_ext.cli score --distributed ...
    oba-ext info                                   # what was built (kernels, CUDA, versions)

Bad input (unknown model/criterion/dataset, a missing or malformed data folder, a ratio outside
(0, 1), a weights file that does not fit, an unreachable target) exits with code 2 and writes
nothing.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

# batch 128 and one thread: a tiny CNN gains nothing from more threads, and a shared CPU
# trains it ~1.6x faster single-threaded (3.5 s vs 5.6 s per epoch measured under load)
DEMO_DEFAULTS = dict(model="small_cnn", dataset="digits", batch_size=128, num_batches=4,
                     train_epochs=6.0, train_lr=0.1, finetune_epochs=3.0, lr=0.02, flops_ratio=0.5,
                     out="demo_out", criteria=None, threads=1)


def _common(p: argparse.ArgumentParser, scoring_only: bool = False) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="resnet56",
                   help="built-in (resnet20/32/56/110, vgg19 = CIFAR VGG-BN, small_cnn), any "
                        "torchvision classification model (resnet18, vgg19_bn, vit_b_16, ...), "
                        "torchvision:NAME (e.g. torchvision:vgg19, the ImageNet one), or timm:NAME "
                        "(needs timm). Default: %(default)s")
    g.add_argument("--weights", metavar="PATH", help="local state-dict file (never downloaded)")
    g.add_argument("--num-classes", type=int, help="default: the dataset's")
    g.add_argument("--dataset", default="cifar10",
                   help="cifar10, cifar100 (torchvision format under --data-root), imagefolder / "
                        "imagenet (ROOT/{train,val}/<class>/<img>), digits (scikit-learn, built "
                        "in), synthetic. Default: %(default)s")
    g.add_argument("--data-root", metavar="DIR", help="folder holding the dataset")
    g.add_argument("--image-size", type=int, help="input size (imagefolder, digits, synthetic)")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--num-batches", type=int, default=8, help="batches used for scoring (default 8)")
    g = p.add_argument_group("scoring")
    g.add_argument("--impl", default="auto", choices=["auto", "reference", "kernel"],
                   help="fast engine (kernel), exact autograd oracles (reference) or auto")
    g.add_argument("--train-mode", action="store_true",
                   help="score with BatchNorm in train mode (default: eval mode; in train mode "
                        "conv output scores before BN vanish, see SPEC §7.3)")
    g.add_argument("--recompute", action="store_true",
                   help="activation checkpointing: recompute forward segments in the backward "
                        "sweep (peak memory down, about one more forward in time; engine only)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default="out", metavar="DIR", help="output folder (default: %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")


def _pruning(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pruning (give exactly one target)")
    g.add_argument("--criteria", "--criterion", nargs="+", metavar="NAME",
                   help="criteria to compare (names from oba_ext.CRITERIA; default: oba)")
    g.add_argument("--flops-ratio", type=float, help="fraction of FLOPs (MACs) kept, in (0, 1)")
    g.add_argument("--params-ratio", type=float, help="fraction of parameters kept, in (0, 1)")
    g.add_argument("--pruning-ratio", type=float, help="Torch-Pruning channel pruning ratio, in (0, 1)")
    g.add_argument("--sparsity", type=float,
                   help="unstructured: fraction of weights zeroed (per-weight scores), in (0, 1)")
    g.add_argument("--scope", default="global", choices=["global", "layer"],
                   help="unstructured ranking: over all layers or per layer")
    g.add_argument("--permanent", action="store_true", help="unstructured: bake masks in (prune.remove)")
    g.add_argument("--steps", type=int, default=1,
                   help="iterative schedule: prune in this many steps, rescoring the current model "
                        "at each (with --finetune-between epochs of training in between)")
    g.add_argument("--finetune-between", type=float, default=0.0, metavar="EPOCHS",
                   help="fine-tuning between iterative steps (default 0)")
    g.add_argument("--group-reduction", default="mean", choices=["mean", "sum", "max", "prod", "first"],
                   help="how a group's layer scores combine (Torch-Pruning convention; the Jacobian "
                        "Criterion of Optimal Brain Connection sums: use 'sum')")
    g.add_argument("--normalizer", default="mean",
                   help="group score normalizer: mean, sum, max, standarization, gaussian, lamp, "
                        "sentinel_Q or none (default: mean)")
    g.add_argument("--local", action="store_true", help="rank channels per layer (default: global)")
    g.add_argument("--round-to", type=int, help="keep channel counts multiples of this")
    g.add_argument("--ignore", nargs="*", default=[], metavar="MODULE",
                   help="module names never pruned (the classifier is always kept)")
    g.add_argument("--tol", type=float, default=0.03, help="relative tolerance of the FLOPs/params target")
    g.add_argument("--equivalent-pruning", action="store_true",
                   help="Optimal Brain Connection: prune identity compressors, fine-tune, merge exactly")
    g = p.add_argument_group("training")
    g.add_argument("--train-epochs", type=float, default=0.0, help="train before pruning (default 0)")
    g.add_argument("--train-lr", type=float, default=0.05)
    g.add_argument("--finetune-epochs", type=float, default=0.0, help="fine-tune after pruning")
    g.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate (cosine schedule)")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    g.add_argument("--save-model", action="store_true", help="also save pruned_<criterion>.pt (torch.save)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oba-ext", description=__doc__.split("\n\n")[0],
        epilog="Run 'oba-ext demo' first: it needs no data and finishes in about a minute on a CPU.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{score,prune,demo,info}")
    sub.required = True
    s = sub.add_parser("score", help="score every layer of a model, save scores.pt/scores.json",
                       description="Score the target layers (Linear/Conv/attention) of a model on "
                                   "--num-batches batches and save scores.pt + scores.json in --out.")
    _common(s)
    s.add_argument("--criterion", default="oba", help="a name from oba_ext.CRITERIA (default: oba)")
    s.add_argument("--granularity", nargs="+", default=["out", "in"],
                   choices=["out", "in", "weight", "head"])
    s.add_argument("--criterion-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of the criterion, repeatable, e.g. --criterion hessian_trace "
                        "--criterion-option num_samples=64 --criterion-option weighted=true "
                        "(oba_ext.CRITERIA[name].options lists them)")
    s.add_argument("--checkpoint", metavar="PATH", help="score-state file; an interrupted run resumes from it")
    s.add_argument("--checkpoint-every", type=int, default=10, metavar="K", help="save every K batches")
    s.add_argument("--distributed", action="store_true",
                   help="under torchrun: each rank scores its shard, results are all-reduced")
    p = sub.add_parser("prune", help="prune to a FLOPs/params/ratio/sparsity target, fine-tune, report",
                       description="Prune a model with one or more criteria to a target, fine-tune, "
                                   "and write report.json, channels.png and scores.png in --out.")
    _common(p)
    _pruning(p)
    d = sub.add_parser("demo", help="digits CNN: oba vs taylor vs magnitude at 50%% FLOPs (CPU, ~1 min)",
                       description="Train a small CNN on scikit-learn's digits, prune it to 50%% of its "
                                   "FLOPs with oba, taylor and magnitude scores, fine-tune briefly and "
                                   "print a before/after table. Writes ./demo_out/.")
    _common(d)
    _pruning(d)
    d.set_defaults(**DEMO_DEFAULTS)
    sub.add_parser("info", help="what was built: kernels, CUDA, versions")
    return parser


def _run(parser: argparse.ArgumentParser, args) -> int:
    from . import workflow
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)
    if args.command == "info":
        from .info import main as info_main
        return info_main() or 0
    if args.command == "score":
        workflow.run_score(args)
        return 0
    if args.command == "demo" and args.criteria is None:
        args.criteria = ["oba", "taylor", workflow.magnitude_criterion()]
    if args.criteria is None:
        args.criteria = ["oba"]
    workflow.run_prune(args, title=args.command)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("batch_size", "num_batches", "steps"):
        if getattr(args, flag, 1) is not None and getattr(args, flag, 1) < 1:
            parser.error(f"--{flag.replace('_', '-')}: expected a positive integer")
    from .data import DatasetError
    from .models import ModelError, WeightsError
    from .pruning import TargetUnreachableError
    from .workflow import UsageError
    try:
        return _run(parser, args)
    except (UsageError, DatasetError, ModelError, WeightsError, TargetUnreachableError) as e:
        parser.error(str(e))  # exits with code 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
