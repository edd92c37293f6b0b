"""Per-parameter quantities of the baseline criteria (reference implementation).

Each function here is a ``QuantityFn``: ``fn(ctx: BatchContext) -> {qualified name: Tensor}``
with one tensor per parameter, shaped like the parameter. The reference scorer sums them into
channels (out: row o + bias o; in: column j; norm: γ_c + β_c), a criterion turns one batch's
channel sums into that batch's score, and :func:`oba_ext.score` averages over batches.

Quantities registered (``p`` a target parameter, or a BN/LN/GN affine parameter when the
criterion has ``norm_layers=True``; ``g = ∇L`` of the batch's mean loss):

- ``"magnitude_l1"``: ``|p_i|``        → channel score Σ|w| (no gradient needed)
- ``"magnitude_l2"``: ``p_i²``         → channel score Σw²; the criterion takes the sqrt
- ``"random"``:       ``u_i ~ U[0,1)`` → a random channel score, seeded (see :func:`random_values`)
- ``"taylor_abs"``:   ``|p_i g_i|``    → channel score Σ|w⊙g|
- ``"fisher"``:       ``p_i² · mean_n (g_n)_i²`` with ``g_n = ∇ℓ_n`` the gradient of sample
  n's own loss (the loss of a batch of one, i.e. not divided by the batch size): the diagonal
  empirical Fisher as a Hessian surrogate in OBD's saliency ``w² h_ii`` (no ½). Per-sample
  gradients come from one batched ``torch.func.vmap(grad)`` pass (chunked), not a loop.
  The criterion is ``per_sample_mean``: :func:`oba_ext.score` weights each batch by its size,
  so the score is the mean over all samples of all batches, whatever the batch sizes
  (Torch-Pruning's OBD-C keeps only the last one). Embedding lookups run as in the oracles
  (:func:`.decompose.embedding_lookup`: the padding row's lookup constant, ``sparse`` dense,
  functional ``max_norm``/``scale_grad_by_freq`` refused by name; ``F.embedding_bag``'s
  too, the bag itself run by torch: first order needs no written-out product).
"""
from __future__ import annotations

import zlib
from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..inputs import batch_size, call_args
from .quantities import register_quantity

#: samples per vmap chunk in the Fisher pass: memory is chunk × |θ| per-sample gradients
FISHER_CHUNK = 64


def _scored_params(ctx) -> Dict[str, Tensor]:
    """Target parameters plus, for norm-layer criteria, the BN/LN/GN affine parameters."""
    out = dict(ctx.params)
    out.update(getattr(ctx, "norm_params", None) or {})
    return out


def magnitude_l1(ctx) -> Dict[str, Tensor]:
    """``|p_i|`` per parameter; channel sums give Σ|w| (L1 norm of the filter/column)."""
    return {n: p.detach().abs() for n, p in _scored_params(ctx).items()}


def magnitude_l2(ctx) -> Dict[str, Tensor]:
    """``p_i²`` per parameter; channel sums give Σw² (criterion ``magnitude_l2`` takes √)."""
    return {n: p.detach().square() for n, p in _scored_params(ctx).items()}


def random_values(name: str, shape, seed: int, dtype=torch.float64, device="cpu") -> Tensor:
    """Uniform [0, 1) values for parameter ``name``: a private generator seeded with
    ``seed`` and the CRC32 of the name, so the values depend only on (seed, name, shape) and
    never consume the global RNG stream."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63))
    return torch.rand(tuple(shape), generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


def random_scores(ctx) -> Dict[str, Tensor]:
    """Seeded random per-parameter values (the ``random`` baseline). The seed is
    ``torch.initial_seed()``: a run that calls ``torch.manual_seed(s)`` gets the same scores
    for the same ``s``; each batch sees the same values, so the batch average equals them."""
    seed = torch.initial_seed()
    return {n: random_values(n, p.shape, seed, p.dtype, p.device)
            for n, p in _scored_params(ctx).items()}


def taylor_abs(ctx) -> Dict[str, Tensor]:
    """``|p_i g_i|`` per parameter, ``g = ∇L`` of the batch (channel sums: Σ|w⊙g|)."""
    grads = ctx.grads()
    return {n: (p.detach() * grads[n]).abs() for n, p in _scored_params(ctx).items()}


class _EmbeddingLookups(TorchFunctionMode):
    """Runs ``F.embedding`` and ``F.embedding_bag`` as the oracles do
    (:func:`.decompose.embedding_lookup`, :func:`.decompose.embedding_bag_refusal`), nothing
    else: a per-sample gradient of a frequency-rescaled or in-place-renormalized lookup is not
    the loss's, so those are refused by name."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding or func is F.embedding_bag:
            from .decompose import embedding_bag_refusal, embedding_lookup
            out = (embedding_lookup if func is F.embedding else embedding_bag_refusal)(
                *args, **kwargs)
            if out is not NotImplemented:
                return out
        return func(*args, **kwargs)


def _float_leaves(out):
    """The floating tensors of a model's output (a tensor, a tuple, a dict, a ``ModelOutput``)."""
    from torch.utils import _pytree as pytree
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, Tensor) and t.is_floating_point()]
    if not leaves and isinstance(getattr(out, "logits", None), Tensor):
        leaves = [out.logits]
    return leaves


def per_sample_grad_squares(model: nn.Module, params: Dict[str, Tensor], inputs, targets,
                            loss_fn, chunk: int = FISHER_CHUNK) -> Dict[str, Tensor]:
    """``Σ_n (∇_p ℓ_n)²`` over the samples of one batch, per parameter in ``params``.

    inputs: a tensor ``(N, ...)``, a tuple of such tensors (``model(*inputs)``) or a dict of
    them (``model(**inputs)``); targets: ``(N, ...)``; ``ℓ_n = loss_fn(model(x_n[None]), t_n[None])``.
    One ``vmap(grad)`` per chunk of ``chunk`` samples; buffers and non-listed parameters are
    held at their current values. Raises ``ValueError`` when a BatchNorm layer is in train
    mode (a sample's gradient through batch statistics is not a per-sample quantity) or an
    input is not a tensor with the batch dimension; :class:`oba_ext.EmptyBatchError` when a
    sample's loss is NaN although the model's outputs are finite (a mean over zero elements:
    the sample would count with a zero gradient, SPEC §8).
    """
    from torch.func import functional_call, grad, vmap
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training:
            raise ValueError(f"model: BatchNorm {name!r} is in train mode; the 'fisher' criterion "
                             f"needs per-sample gradients, call model.eval() first")
    args, kwargs = call_args(inputs)
    n = batch_size(inputs)
    for i, x in list(enumerate(args)) + list(kwargs.items()):
        if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] != n:
            raise ValueError(f"inputs: item {i!r} must be a tensor with batch dimension {n}")
    if not isinstance(targets, Tensor) or targets.dim() == 0 or targets.shape[0] != n:
        raise ValueError(f"targets: expected a tensor with batch dimension {n}")
    detached = {k: v.detach() for k, v in params.items()}

    def sample_loss(p, xs, kw, t):
        out = functional_call(model, p, tuple(x.unsqueeze(0) for x in xs),
                              {k: x.unsqueeze(0) for k, x in kw.items()})
        loss = loss_fn(out, t.unsqueeze(0))
        outs = _float_leaves(out)  # none found: unknown, never called empty
        finite = (torch.stack([torch.isfinite(o).all() for o in outs]).all() if outs
                  else torch.zeros((), dtype=torch.bool, device=loss.device))
        return loss, (loss.detach(), finite)

    per_sample = vmap(grad(sample_loss, has_aux=True), in_dims=(None, 0, 0, 0),
                      randomness="different")
    acc = {k: torch.zeros_like(v) for k, v in detached.items()}
    for s in range(0, n, chunk):
        with _EmbeddingLookups():
            g, (loss, finite) = per_sample(detached, tuple(x[s:s + chunk] for x in args),
                                           {k: x[s:s + chunk] for k, x in kwargs.items()},
                                           targets[s:s + chunk])
        empty = (torch.isnan(loss) & finite).nonzero().flatten()
        if empty.numel():  # as oba_ext.losses.check_loss_not_empty, per sample
            from ..losses import EmptyBatchError
            err = EmptyBatchError(
                f"sample(s) {(empty + s).tolist()[:8]} are empty: their loss is NaN although "
                f"the model's outputs are finite, a mean over zero elements (an empty sequence, "
                f"or every target ignored); the 'fisher' criterion averages over samples, so "
                f"drop such samples before scoring (SPEC §8)")
            err.whole_batch = False
            raise err
        for k in acc:
            acc[k] += g[k].square().sum(0)
    return acc


def fisher(ctx) -> Dict[str, Tensor]:
    """``p_i² · mean_n (∇ℓ_n)_i²`` per parameter over the batch's samples (diagonal empirical
    Fisher OBD saliency, no ½)."""
    params = _scored_params(ctx)
    sq = per_sample_grad_squares(ctx.model, params, ctx.inputs, ctx.targets, ctx.loss_fn)
    n = batch_size(ctx.inputs)
    return {k: p.detach().square() * sq[k] / n for k, p in params.items()}


register_quantity("magnitude_l1", magnitude_l1)
register_quantity("magnitude_l2", magnitude_l2)
register_quantity("random", random_scores)
register_quantity("taylor_abs", taylor_abs)
register_quantity("fisher", fisher)
