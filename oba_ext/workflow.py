"""The user-facing workflows behind ``oba-ext score | prune | demo`` (argument parsing lives in
:mod:`oba_ext.cli`). Every workflow writes into a fresh temporary folder next to the requested
output folder and renames it into place only at the end, so a failure leaves nothing half-written.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from typing import Dict, Optional

import torch
import torch.distributed as dist

from . import criteria as _criteria
from .data import get_dataset, make_loader
from .models import BUILTIN, get_model
from .pruning import OBAImportance, count, prune_once, prune_to_target
from .pruning import equivalent as eq
from .pruning.unstructured import prune_unstructured, refresh_masked_weights, sparsity_of
from .report import channels_per_layer, plot_channels, plot_score_distributions, write_json
from .scoring import score
from .train import evaluate, fit


class UsageError(ValueError):
    """Bad command-line input (reported argparse-style, exit code 2)."""


@contextmanager
def staged_output(out: str, enabled: bool = True):
    """Yield a temporary folder that replaces ``out`` when the block succeeds."""
    if not enabled:
        yield None
        return
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
        os.replace(out, os.path.join(old, "x"))
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_criterion(name: str) -> str:
    if name not in _criteria.CRITERIA:
        raise UsageError(f"--criterion: unknown criterion {name!r}; choose from "
                         f"{sorted(_criteria.CRITERIA)}")
    return name


def criterion_options(criterion: str, items) -> Dict[str, object]:
    """``--criterion-option KEY=VALUE`` flags -> the criterion's validated options (ints, floats
    and true/false parsed; other values kept as strings). ``UsageError`` naming the flag."""
    given: Dict[str, object] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key:
            raise UsageError(f"--criterion-option: expected KEY=VALUE, got {item!r}")
        value: object = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        elif raw.lower() == "none":
            value = None
        else:
            for conv in (int, float):
                try:
                    value = conv(raw)
                    break
                except ValueError:
                    continue
        given[key] = value
    try:
        return _criteria.resolve_options(_criteria.get(criterion), given)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--criterion-option: {e}") from None


def check_fraction(flag: str, value: Optional[float]) -> None:
    if value is not None and not 0.0 < value < 1.0:
        raise UsageError(f"{flag}: expected a fraction in (0, 1), got {value}")


def magnitude_criterion() -> str:
    for n in ("magnitude_l2", "magnitude_l1", "magnitude"):
        if n in _criteria.CRITERIA:
            return n
    raise UsageError("no magnitude criterion is registered in oba_ext.criteria.CRITERIA")


def setup(args):
    """Model, data loaders and scoring batches from parsed arguments (validated up front)."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    train = get_dataset(args.dataset, args.data_root, train=True, image_size=args.image_size)
    test = get_dataset(args.dataset, args.data_root, train=False, image_size=args.image_size)
    num_classes = args.num_classes or train.num_classes
    model = get_model(args.model, num_classes=num_classes, weights=args.weights,
                      **({"in_channels": train.input_shape[0]} if args.model in BUILTIN else {}))
    model.to(device).eval()
    names = dict(model.named_modules())
    bad = [n for n in getattr(args, "ignore", None) or [] if n not in names]
    if bad:
        raise UsageError(f"--ignore: {bad} are not modules of {args.model} "
                         f"(e.g. {[n for n in names if n][:4]})")
    fit_set = train.dataset
    if args.dataset in ("cifar10", "cifar100"):  # crop + flip for (fine-)tuning, not for scoring
        fit_set = get_dataset(args.dataset, args.data_root, train=True, augment=True).dataset
    train_loader = make_loader(fit_set, args.batch_size, shuffle=True, seed=args.seed)
    test_loader = make_loader(test.dataset, args.batch_size, shuffle=False)
    batches = []
    for i, b in enumerate(make_loader(train.dataset, args.batch_size, shuffle=True, seed=args.seed)):
        if i >= args.num_batches:
            break
        batches.append(b)
    example = torch.zeros((1, *train.input_shape), device=device)
    return model, train_loader, test_loader, batches, example, device


def _macs_params(model, example):
    refresh_masked_weights(model)  # masked (unstructured) models must be deep-copyable
    macs, params = count(model, example)
    nonzero = sum(int(p.count_nonzero()) for p in model.parameters())
    masked = [m for m in model.modules() if hasattr(m, "weight_orig")]
    nonzero -= sum(int(m.weight_orig.count_nonzero()) - int(m.weight.count_nonzero()) for m in masked)
    return {"macs": macs, "params": params, "nonzero_params": nonzero}


def run_score(args) -> dict:
    """``oba-ext score``: scores of every target layer, saved as ``scores.pt`` + ``scores.json``."""
    check_criterion(args.criterion)
    options = criterion_options(args.criterion, getattr(args, "criterion_option", ()))
    rank, world = 0, 1
    if args.distributed:
        if "RANK" not in os.environ:
            raise UsageError("--distributed: launch with torchrun (RANK/WORLD_SIZE are not set)")
        backend = "nccl" if torch.device(args.device).type == "cuda" else "gloo"
        if backend == "nccl" and torch.device(args.device).index is None:
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"  # one GPU per rank
            torch.cuda.set_device(torch.device(args.device))
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
    try:
        model, _, _, batches, _, _ = setup(args)
        if args.train_mode:
            model.train()
        t0 = time.perf_counter()
        res = score(model, batches[rank::world], kind=args.criterion, granularity=tuple(args.granularity),
                    impl=args.impl, progress=not args.no_progress and rank == 0,
                    checkpoint=(f"{args.checkpoint}.rank{rank}" if args.checkpoint and world > 1
                                else args.checkpoint),
                    checkpoint_every=args.checkpoint_every, recompute=args.recompute,
                    distributed=args.distributed, criterion_options=options)
        seconds = time.perf_counter() - t0
        summary = {"model": args.model, "criterion": args.criterion,
                   "criterion_options": options, "impl": res.impl, "recompute": args.recompute,
                   "num_batches": res.num_batches, "world_size": world, "seconds": seconds,
                   "layers": {n: {k: list(t.shape) for k, t in ls.by_key().items()}
                              for n, ls in res.items()}}
        with staged_output(args.out, enabled=rank == 0) as tmp:
            if tmp is not None:
                torch.save({n: ls.by_key() for n, ls in res.items()}, os.path.join(tmp, "scores.pt"))
                write_json(summary, os.path.join(tmp, "scores.json"))
        if rank == 0:
            print(res.summary())
            print(f"wrote {os.path.join(args.out, 'scores.pt')} ({seconds:.1f} s)")
        return summary
    finally:
        if args.distributed:
            dist.destroy_process_group()


def _prune_one(model, criterion, batches, example, args, train_loader, test_loader, progress) -> dict:
    """Prune a copy of ``model`` with ``criterion``; fine-tune; return facts + the pruned model."""
    if getattr(args, "equivalent_pruning", False):
        return _prune_equivalent(model, criterion, batches, example, args, train_loader,
                                 test_loader, progress)
    t0 = time.perf_counter()
    facts: Dict[str, object] = {"criterion": criterion}
    if args.sparsity is not None:
        pruned = copy.deepcopy(model)
        masks, res = prune_unstructured(pruned, batches, args.sparsity, kind=criterion, scope=args.scope,
                                        permanent=args.permanent, impl=args.impl, progress=progress,
                                        recompute=args.recompute)
        facts["sparsity"] = sparsity_of(pruned, list(masks))
        scores = res
    else:
        imp = OBAImportance(kind=criterion, batches=batches, impl=args.impl, progress=progress,
                            eval_mode=not args.train_mode, group_reduction=args.group_reduction,
                            normalizer=None if args.normalizer == "none" else args.normalizer,
                            score_kwargs={"recompute": args.recompute})
        scores = imp.scores_for(model)  # the unpruned model's scores (cached for the search)
        kw = dict(global_pruning=not args.local, round_to=args.round_to, ignored_layers=args.ignore)
        if args.flops_ratio is not None or args.params_ratio is not None:
            between = None
            if args.finetune_between > 0:
                def between(m, k):
                    fit(m, train_loader, epochs=args.finetune_between, lr=args.lr,
                        optimizer=args.optimizer, progress=progress, desc=f"fine-tune step {k}")
                    m.eval()
            outcome = prune_to_target(model, example, imp, flops_ratio=args.flops_ratio,
                                      params_ratio=args.params_ratio, tol=args.tol, steps=args.steps,
                                      between_steps=between, progress=progress, **kw)
            pruned = outcome.model
            facts["target"] = outcome.as_dict()
        else:
            pruned = copy.deepcopy(model)
            for k in range(1, args.steps + 1):
                # each step removes the same fraction of what is left: (1 - r)^(1/steps) kept
                prune_once(pruned, example, imp, 1 - (1 - args.pruning_ratio) ** (1 / args.steps), **kw)
                if args.finetune_between > 0 and k < args.steps:
                    fit(pruned, train_loader, epochs=args.finetune_between, lr=args.lr,
                        optimizer=args.optimizer, progress=progress, desc=f"fine-tune step {k}")
    facts["prune_seconds"] = time.perf_counter() - t0
    facts.update({f"{k}_after": v for k, v in _macs_params(pruned, example).items()})
    facts["acc_after_prune"] = evaluate(pruned, test_loader)
    _finetune(pruned, args, train_loader, progress, f"fine-tune [{criterion}]", facts)
    facts["acc_after_finetune"] = evaluate(pruned, test_loader)
    facts["channels"] = channels_per_layer(pruned)
    return {"facts": facts, "model": pruned, "scores": scores}


def _finetune(model, args, train_loader, progress, desc: str, facts: dict) -> None:
    """The final fine-tune of a prune run (``--finetune-epochs``), timed into ``facts``."""
    t1 = time.perf_counter()
    if args.finetune_epochs > 0:
        fit(model, train_loader, epochs=args.finetune_epochs, lr=args.lr,
            optimizer=args.optimizer, progress=progress, desc=desc)
    facts["finetune_seconds"] = time.perf_counter() - t1


def _prune_equivalent(model, criterion: str, batches, example, args, train_loader, test_loader,
                      progress: bool) -> dict:
    """``--equivalent-pruning``: Optimal Brain Connection's Equivalent Pruning (SPEC §6).

    Insert identity compressors/decompressors → score the compressor rows with the criterion →
    keep the best rows to the FLOPs/params target (bisection on merged copies) or the pruning
    ratio → prune the compressors → fine-tune *with* the compressors → merge exactly into a plain
    network whose cost equals the naively pruned one. Returns ``{"facts", "model", "scores"}``
    like :func:`_prune_one` (``model`` is the merged, plain network)."""
    if args.sparsity is not None:
        raise UsageError("--equivalent-pruning: prunes channels; use --flops-ratio, --params-ratio "
                         "or --pruning-ratio, not --sparsity")
    t0 = time.perf_counter()
    work = copy.deepcopy(model)
    work.train(bool(args.train_mode))
    ignore = set(args.ignore or ())
    chains = [c for c in eq.find_chains(work) if c.producer not in ignore]
    if not chains:
        raise UsageError(f"--equivalent-pruning: {args.model} has no conv→BN→act→conv or "
                         f"Linear→act→Linear chain to compress (after --ignore)")
    eq.insert_compressors(work, chains)
    scores = eq.score_compressors(work, batches, kind=criterion, impl=args.impl, progress=progress,
                                  recompute=args.recompute)
    sel = dict(global_ranking=not args.local, round_to=args.round_to or 1)
    facts: Dict[str, object] = {"criterion": criterion, "equivalent_pruning": True,
                                "chains": [[c.producer, c.consumer] for c in chains]}
    if args.pruning_ratio is not None:
        keep = eq.select_keep(scores, work, args.pruning_ratio, **sel)
    else:
        which = 0 if args.flops_ratio is not None else 1  # count() -> (MACs, params)
        target = args.flops_ratio if args.flops_ratio is not None else args.params_ratio
        keep = eq.select_keep_for_target(scores, work, lambda m: count(m, example)[which],
                                         target, tol=args.tol * target, **sel)
        facts["target"] = {"metric": "flops" if which == 0 else "params", "target": target}
    eq.prune_compressors(work, keep)
    facts["kept_rows"] = {p: int(k.numel()) for p, k in keep.items()}
    facts["prune_seconds"] = time.perf_counter() - t0
    work.eval()
    facts["acc_after_prune"] = evaluate(work, test_loader)
    _finetune(work, args, train_loader, progress, f"fine-tune [{criterion}, equivalent]", facts)
    pruned = eq.merge_compressors(work).eval()
    facts.update({f"{k}_after": v for k, v in _macs_params(pruned, example).items()})
    if "target" in facts:
        key = "macs" if facts["target"]["metric"] == "flops" else "params"
        facts["target"]["achieved"] = facts[f"{key}_after"] / _macs_params(model, example)[key]
    facts["acc_after_finetune"] = evaluate(pruned, test_loader)
    facts["channels"] = channels_per_layer(pruned)
    return {"facts": facts, "model": pruned, "scores": scores}


def _validate_prune(args):
    for c in args.criteria:
        check_criterion(c)
    norms = ("mean", "sum", "max", "standarization", "gaussian", "lamp", "none")
    if args.normalizer not in norms and not args.normalizer.startswith("sentinel_"):
        raise UsageError(f"--normalizer: expected one of {list(norms)} or sentinel_Q, got {args.normalizer!r}")
    for flag in ("flops_ratio", "params_ratio", "pruning_ratio", "sparsity"):
        check_fraction("--" + flag.replace("_", "-"), getattr(args, flag))
    given = [f for f in ("flops_ratio", "params_ratio", "pruning_ratio", "sparsity")
             if getattr(args, f) is not None]
    if len(given) != 1:
        raise UsageError("give exactly one of --flops-ratio, --params-ratio, --pruning-ratio, --sparsity"
                         + (f" (got {', '.join('--' + g.replace('_', '-') for g in given)})" if given else ""))


def run_prune(args, title: str = "prune") -> dict:
    """``oba-ext prune`` and ``oba-ext demo``: prune with each criterion, fine-tune, report."""
    _validate_prune(args)
    progress = not args.no_progress
    model, train_loader, test_loader, batches, example, device = setup(args)
    with staged_output(args.out) as tmp:
        t0 = time.perf_counter()
        if args.train_epochs > 0:
            fit(model, train_loader, epochs=args.train_epochs, lr=args.train_lr, optimizer=args.optimizer,
                progress=progress, desc="train")
        report = {"command": title, "model": args.model, "dataset": args.dataset, "seed": args.seed,
                  "train_seconds": time.perf_counter() - t0,
                  "before": {**_macs_params(model, example), "acc": evaluate(model, test_loader),
                             "channels": channels_per_layer(model)},
                  "runs": {}}
        runs = {}
        for crit in args.criteria:
            torch.manual_seed(args.seed)
            runs[crit] = _prune_one(model, crit, batches, example, args, train_loader, test_loader,
                                    progress)
            report["runs"][crit] = runs[crit]["facts"]
            if args.save_model:
                torch.save(runs[crit]["model"], os.path.join(tmp, f"pruned_{crit}.pt"))
        report["total_seconds"] = time.perf_counter() - t0
        write_json(report, os.path.join(tmp, "report.json"))
        plot_channels(report["before"]["channels"], {c: r["facts"]["channels"] for c, r in runs.items()},
                      os.path.join(tmp, "channels.png"))
        dists = {c: r["scores"] for c, r in runs.items() if r["scores"] is not None}
        if dists:
            plot_score_distributions(dists, os.path.join(tmp, "scores.png"))
    print(format_table(report))
    print(f"report and plots in {os.path.abspath(args.out)}/ ({report['total_seconds']:.1f} s)")
    return report


def format_table(report: dict) -> str:
    b = report["before"]
    rows = [f"{'':<14}{'params':>12}{'MACs':>14}{'acc pruned':>12}{'acc tuned':>12}",
            f"{'unpruned':<14}{b['params']:>12,.0f}{b['macs']:>14,.0f}{b['acc']:>12.2%}{'':>12}"]
    for c, f in report["runs"].items():
        rows.append(f"{c:<14}{f['params_after']:>12,.0f}{f['macs_after']:>14,.0f}"
                    f"{f['acc_after_prune']:>12.2%}{f['acc_after_finetune']:>12.2%}")
    return "\n".join(rows)
