"""``oba-ext prune --equivalent-pruning``: Optimal Brain Connection's Equivalent Pruning as one
run of the prune workflow (:func:`oba_ext.workflow._prune_one` hands over to :func:`run_equivalent`).

Order (SPEC §6): insert identity compressors/decompressors → score the compressor rows with the
criterion → keep the best rows to the FLOPs/params target (bisection on merged copies) or the
pruning ratio → prune the compressors → fine-tune *with* the compressors → merge exactly into a
plain network whose cost equals the naively pruned one.
"""
from __future__ import annotations

import copy
import time
from typing import Dict

from . import equivalent as eq


def run_equivalent(model, criterion: str, batches, example, args, train_loader, test_loader,
                   progress: bool) -> dict:
    """Prune a copy of ``model`` by Equivalent Pruning; returns ``{"facts", "model", "scores"}``
    like the workflow's other prune runs (``model`` is the merged, plain network)."""
    from ..train import evaluate, fit
    from ..workflow import UsageError, _macs_params
    from ..report import channels_per_layer
    from .structured import count

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
    scores = eq.score_compressors(work, batches, kind=criterion, impl=args.impl, progress=progress)
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
    t1 = time.perf_counter()
    if args.finetune_epochs > 0:
        fit(work, train_loader, epochs=args.finetune_epochs, lr=args.lr, optimizer=args.optimizer,
            progress=progress, desc=f"fine-tune [{criterion}, equivalent]")
    facts["finetune_seconds"] = time.perf_counter() - t1
    pruned = eq.merge_compressors(work).eval()
    facts.update({f"{k}_after": v for k, v in _macs_params(pruned, example).items()})
    if "target" in facts:
        key = "macs" if facts["target"]["metric"] == "flops" else "params"
        facts["target"]["achieved"] = facts[f"{key}_after"] / _macs_params(model, example)[key]
    facts["acc_after_finetune"] = evaluate(pruned, test_loader)
    facts["channels"] = channels_per_layer(pruned)
    return {"facts": facts, "model": pruned, "scores": scores}
