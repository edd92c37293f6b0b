"""Generic brute-force second-order scores on small float64 nn.Modules (independent of
``oba_ext.reference``): the full Hessian of the loss over the target parameters, and the
Gauss-Newton matrix. For a ReLU/max-pool/eval-BN network without attention, OBA's Ĥ = H − GGN
(SPEC §2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call, hessian, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

import oba_ext
from oba_ext.targets import target_parameters


def target_params(model):
    return {n: p.detach() for n, p in target_parameters(oba_ext.find_layers(model)).items()}


def flat(params):
    names = list(params)
    shapes = [params[n].shape for n in names]
    vec = torch.cat([params[n].reshape(-1) for n in names])

    def unflat(v):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            k = s.numel()
            out[n] = v[i:i + k].reshape(s)
            i += k
        return out
    return names, vec.detach(), unflat


def hessian_and_ggn_scores(model, x, y, loss=F.cross_entropy, with_ggn=True):
    """``{name: θ⊙Hθ}`` and (``with_ggn``) ``{name: θ⊙(H − GGN)θ}`` over the target parameters,
    by full matrices. Buffers are cloned per call; SDPA runs on torch's math backend (the fused
    CPU kernel has no forward-mode AD)."""
    tp = target_params(model)
    others = {n: p.detach() for n, p in model.named_parameters() if n not in tp}
    bufs = dict(model.named_buffers())
    _, v0, unflat = flat(tp)

    def f(v):
        return functional_call(model, {**others, **{n: b.clone() for n, b in bufs.items()},
                                       **unflat(v)}, (x,))
    with sdpa_kernel(SDPBackend.MATH):
        H = hessian(lambda v: loss(f(v), y))(v0)
        exact = {n: tp[n] * h for n, h in unflat(H @ v0).items()}
        if not with_ggn:
            return exact, None
        J = jacrev(f)(v0).reshape(-1, v0.numel())
        z0 = f(v0).detach()
    Hl = hessian(lambda z: loss(z, y))(z0).reshape(z0.numel(), z0.numel())
    oba = {n: tp[n] * h for n, h in unflat((H - J.T @ Hl @ J) @ v0).items()}
    return exact, oba
