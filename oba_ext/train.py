"""A plain fine-tuning loop and top-1 evaluation.

``fit``: SGD (momentum 0.9, Nesterov) or AdamW, cosine learning-rate schedule over all steps,
automatic mixed precision (bfloat16 autocast) on CUDA, cross-entropy loss, tqdm progress.
``evaluate``: top-1 accuracy in eval mode.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch
from torch import nn

_OPTIMIZERS = {
    "sgd": lambda params, lr, wd: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True,
                                                  weight_decay=wd),
    "adamw": lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
}


def _autocast(device: torch.device, amp: Optional[bool]):
    use = (device.type == "cuda") if amp is None else amp
    if use and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def fit(model: nn.Module, loader: Iterable, epochs: float = 1.0, lr: float = 0.01,
        optimizer: str = "sgd", weight_decay: float = 5e-4, amp: Optional[bool] = None,
        max_steps: Optional[int] = None, progress: bool = True, desc: str = "fine-tune") -> list:
    """Train ``model`` in place for ``epochs`` passes (fractions allowed) or ``max_steps``
    steps over ``loader`` of (inputs, targets). Returns the per-step losses."""
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {sorted(_OPTIMIZERS)}, got {optimizer!r}")
    if lr <= 0:
        raise ValueError(f"lr: expected > 0, got {lr}")
    device = _device_of(model)
    n_batches = len(loader)
    total = int(round(epochs * n_batches)) if max_steps is None else int(max_steps)
    if total <= 0:
        return []
    opt = _OPTIMIZERS[optimizer]([p for p in model.parameters() if p.requires_grad], lr, weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    model.train()
    losses = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)
    step = 0
    try:
        while step < total:
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with _autocast(device, amp):
                    loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                step += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if step >= total:
                    break
    finally:
        if bar is not None:
            bar.close()
    model.eval()
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, progress: bool = False,
             amp: Optional[bool] = None) -> float:
    """Top-1 accuracy (in [0, 1]) of ``model`` in eval mode over ``loader``."""
    device = _device_of(model)
    was = model.training
    model.eval()
    correct = total = 0
    it = loader
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(loader, desc="evaluate", unit="batch", leave=False)
    try:
        for x, y in it:
            x, y = x.to(device), y.to(device)
            with _autocast(device, amp):
                pred = model(x).argmax(1)
            correct += int((pred == y).sum())
            total += y.numel()
    finally:
        model.train(was)
    if total == 0:
        raise ValueError("loader: no samples to evaluate")
    return correct / total
