"""Ops that hide products, written out for the oracles (and the engine's decomposing rule).

The fused kernels behind ``F.scaled_dot_product_attention`` and
``F.multi_head_attention_forward`` hide the two products ``Q Kᵀ`` and ``A V`` from a
``TorchFunctionMode``, and may lack double-backward support. The oracles replace them with the
plain math of SPEC §4 (``S = s·QKᵀ + mask``, ``A = softmax(S)``, ``O = AV``), evaluated with
``torch.matmul`` so that each product is seen by the recorder.

The same holds for every op that contains a product of two θ-dependent values (SPEC §8): GLU,
``addcmul``, ``F.bilinear``/``nn.Bilinear``, ``addmm``/``baddbmm``/``addbmm``/``addmv``/
``addr``, einsum of three or more operands, and the recurrent layers (``nn.LSTM``/``GRU``/
``RNN`` and their cells, via the ``torch._VF`` functions they call). :data:`DECOMPOSITIONS`
maps each to its written-out form; :data:`RANDOM_MASKS` draws dropout masks once per pass.
The written-out forms are the definition of these ops for ``oba`` and ``exact`` alike (every
pass of the oracles runs them), so e.g. ``nn.LSTM``'s scores are those of the same LSTM written
with explicit gate products.
"""
from __future__ import annotations

import inspect
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import RefusedError


def sdpa_math(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
              enable_gqa: bool = False) -> Tensor:
    """``F.scaled_dot_product_attention`` as ``softmax(s·QKᵀ + mask) V`` (dropout must be 0).

    query: (..., L, E), key: (..., S, E), value: (..., S, Ev); a boolean ``attn_mask`` marks the
    positions that take part (True), a float mask is added to the logits.
    """
    if dropout_p:
        raise RefusedError("oba_ext reference: attention dropout must be off "
                           f"(dropout_p={dropout_p}); score in eval mode")
    if enable_gqa:
        rep = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(rep, dim=-3)
        value = value.repeat_interleave(rep, dim=-3)
    L, S = query.size(-2), key.size(-2)
    s = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    logits = torch.matmul(query, key.transpose(-2, -1)) * s
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        logits = logits.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask
    return torch.matmul(torch.softmax(logits, dim=-1), value)


_MHA_SIG = inspect.signature(F.multi_head_attention_forward)


def mha_causal_replaces_mask(attn_mask, key_padding_mask, need_weights: bool, is_causal: bool,
                             who: str) -> bool:
    """torch's reading of ``nn.MultiheadAttention``'s ``is_causal`` hint
    (``F.multi_head_attention_forward``), shared by the reference path and the engine: without
    ``attn_mask`` the hint is refused — torch raises "Need attn_mask if specifying the is_causal
    hint" — so this raises :class:`~oba_ext.errors.RefusedError` naming ``who`` (the module);
    with a mask, and with neither ``key_padding_mask`` nor ``need_weights``, torch's attention
    applies the causal mask *instead of* ``attn_mask`` (the hint says they are the same; True is returned); otherwise
    ``attn_mask`` is used and the hint ignored (False)."""
    if not is_causal:
        return False
    if attn_mask is None:
        raise RefusedError(f"{who}: is_causal=True without attn_mask; torch's own "
                           f"nn.MultiheadAttention forward refuses it (\"Need attn_mask if "
                           f"specifying the is_causal hint\"). Pass the causal mask too "
                           f"(attn_mask=nn.Transformer.generate_square_subsequent_mask(L), "
                           f"is_causal=True), or the mask alone")
    return key_padding_mask is None and not need_weights


def mha_math(*args, **kwargs):
    """``F.multi_head_attention_forward`` (sequence-first, as nn.MultiheadAttention calls it),
    written with F.linear and :func:`sdpa_math`-style products. Supports packed and separate
    q/k/v projection weights, attn_mask, key_padding_mask, need_weights and is_causal (as torch
    reads it, :func:`mha_causal_replaces_mask`: refused without attn_mask);
    bias_k/bias_v, add_zero_attn, static_k/static_v and dropout are refused."""
    a = _MHA_SIG.bind(*args, **kwargs)
    a.apply_defaults()
    p = a.arguments
    for name in ("bias_k", "bias_v", "static_k", "static_v"):
        if p[name] is not None:
            raise RefusedError(f"oba_ext reference: nn.MultiheadAttention with {name} "
                               "is not supported")
    if p["add_zero_attn"]:
        raise RefusedError("oba_ext reference: nn.MultiheadAttention with add_zero_attn is not "
                           "supported")
    if p["training"] and p["dropout_p"]:
        raise RefusedError("oba_ext reference: attention dropout must be off; score in "
                           "eval mode")
    query, key, value = p["query"], p["key"], p["value"]
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    L, N, E = query.shape
    S = key.shape[0]
    H = p["num_heads"]
    hd = E // H
    b = p["in_proj_bias"]
    bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
    if p["use_separate_proj_weight"]:
        wq, wk, wv = p["q_proj_weight"], p["k_proj_weight"], p["v_proj_weight"]
    else:
        wq, wk, wv = p["in_proj_weight"].chunk(3)
    q = F.linear(query, wq, bq)
    k = F.linear(key, wk, bk)
    v = F.linear(value, wv, bv)
    # (L, N, E) -> (N, H, L, hd)
    q = q.reshape(L, N, H, hd).permute(1, 2, 0, 3)
    k = k.reshape(S, N, H, hd).permute(1, 2, 0, 3)
    v = v.reshape(S, N, H, hd).permute(1, 2, 0, 3)

    logits = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
    attn_mask, kpm = p["attn_mask"], p["key_padding_mask"]
    if mha_causal_replaces_mask(attn_mask, kpm, p["need_weights"], p["is_causal"],
                                f"nn.MultiheadAttention (embed_dim={E}, num_heads={H}; "
                                f"F.multi_head_attention_forward)"):
        attn_mask = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1)  # True = masked
    if attn_mask is not None:
        if attn_mask.dim() == 3:  # (N*H, L, S)
            attn_mask = attn_mask.reshape(N, H, L, S)
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask
    if kpm is not None:
        if not batched:
            kpm = kpm.unsqueeze(0)
        kpm = kpm.reshape(N, 1, 1, S)
        if kpm.dtype == torch.bool:
            logits = logits.masked_fill(kpm, float("-inf"))
        else:
            logits = logits + kpm
    attn = torch.softmax(logits, dim=-1)
    out = torch.matmul(attn, v)                                   # (N, H, L, hd)
    out = out.permute(2, 0, 1, 3).reshape(L, N, E)
    out = F.linear(out, p["out_proj_weight"], p["out_proj_bias"])
    weights = None
    if p["need_weights"]:
        weights = attn.mean(dim=1) if p["average_attn_weights"] else attn
        if not batched:
            weights = weights.squeeze(0)
    if not batched:
        out = out.squeeze(1)
    return out, weights


#: functions whose body the oracles replace by explicit products (re-entering the recorder);
#: a decomposition may return ``NotImplemented`` to leave a call as it is
DECOMPOSITIONS = {
    F.scaled_dot_product_attention: sdpa_math,
    F.multi_head_attention_forward: mha_math,
}


# ---------------------------------------------------------------------------------------------
# Products hidden inside one op (SPEC §8): each is written out with the elementwise products and
# matmuls it contains, so that the recorder sees every product of two θ-dependent values.
# ``F.glu(z) ≡ a * sigmoid(b)``, ``addcmul ≡ input + value * (t1 * t2)``, … The engine runs the
# same functions (``oba_ext.engine.rules.products``), so both paths score the same network.
# ---------------------------------------------------------------------------------------------

def glu_math(input: Tensor, dim: int = -1) -> Tensor:
    """``F.glu``: ``a * sigmoid(b)`` with ``a, b = input.chunk(2, dim)``."""
    a, b = input.chunk(2, dim)
    return a * torch.sigmoid(b)


def _value(args, kwargs, i, default=1):
    v = args[i] if len(args) > i else kwargs.get("value", default)
    return v


def addcmul_math(input: Tensor, tensor1: Tensor, tensor2: Tensor, *args, value=1, **kw) -> Tensor:
    """``torch.addcmul`` (function and method form): ``input + value * (tensor1 * tensor2)``."""
    if args:
        value = args[0]
    if "out" in kw:
        raise NotImplementedError("oba_ext: torch.addcmul(..., out=...) is not supported")
    prod = tensor1 * tensor2
    return input + (prod if value == 1 else value * prod)


def addcdiv_math(input: Tensor, tensor1: Tensor, tensor2: Tensor, *args, value=1, **kw) -> Tensor:
    """``torch.addcdiv``: ``input + value * (tensor1 / tensor2)``. Division is linearized like any
    op that is not a product (softmax and LayerNorm divide too, SPEC §2), so addcdiv has no
    bilinear node: it equals its written-out form ``input + value * tensor1 / tensor2``."""
    if args:
        value = args[0]
    if "out" in kw:
        raise NotImplementedError("oba_ext: torch.addcdiv(..., out=...) is not supported")
    q = tensor1 / tensor2
    return input + (q if value == 1 else value * q)


def bilinear_math(input1: Tensor, input2: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.bilinear`` / ``nn.Bilinear``: ``y_o = x1ᵀ W_o x2 + b_o`` as two products
    ``(x1 · W) · x2`` (a product of three factors is the chain of its pairwise products)."""
    t = torch.einsum("...i,oij->...oj", input1, weight)
    y = torch.einsum("...oj,...j->...o", t, input2)
    return y if bias is None else y + bias


def einsum_math(equation, *operands) -> Tensor:
    """``torch.einsum`` of three or more operands as a left-to-right chain of two-operand
    einsums (each a bilinear node; a multilinear product's second derivative does not depend on
    the order of contraction). Two operands or fewer: ``NotImplemented`` (the recorder then
    treats the call as one bilinear node)."""
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if len(operands) <= 2 or not isinstance(equation, str):
        return NotImplemented  # the recorder's own two-operand split applies
    eq = equation.replace(" ", "")
    if "..." in eq:
        raise NotImplementedError("oba_ext: einsum with '...' and more than two operands is not "
                                  "supported; write it as two-operand einsums")
    if "->" in eq:
        lhs, out = eq.split("->")
    else:
        lhs = eq
        letters = lhs.replace(",", "")
        out = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    subs = lhs.split(",")
    if len(subs) != len(operands):
        raise ValueError(f"einsum: equation {equation!r} names {len(subs)} operands, got "
                         f"{len(operands)}")
    cur, cur_sub = operands[0], subs[0]
    for k in range(1, len(operands)):
        later = "".join(subs[k + 1:]) + out
        keep = []
        for c in cur_sub + subs[k]:
            if c in later and c not in keep:
                keep.append(c)
        res = "".join(keep)
        cur = torch.einsum(f"{cur_sub},{subs[k]}->{res}", cur, operands[k])
        cur_sub = res
    if cur_sub != out:
        cur = torch.einsum(f"{cur_sub}->{out}", cur)
    return cur


def _addmm_family(product, input, a, b, beta=1, alpha=1):
    y = product(a, b)
    if alpha != 1:
        y = alpha * y
    if beta == 0:
        return y
    return y + (input if beta == 1 else beta * input)


def _addmm_like(product, names):
    def fn(input, a, b, *args, beta=1, alpha=1, **kw):
        if args:
            raise NotImplementedError(f"oba_ext: positional beta/alpha in {names} are not supported")
        if "out" in kw:
            raise NotImplementedError(f"oba_ext: {names}(..., out=...) is not supported")
        return _addmm_family(product, input, a, b, beta, alpha)
    fn.__name__ = f"{names}_math"
    fn.__doc__ = f"``torch.{names}``: ``beta·input + alpha·product(a, b)`` with the product explicit."
    return fn


addmm_math = _addmm_like(torch.mm, "addmm")
baddbmm_math = _addmm_like(torch.bmm, "baddbmm")
addbmm_math = _addmm_like(lambda a, b: torch.bmm(a, b).sum(0), "addbmm")
addmv_math = _addmm_like(torch.mv, "addmv")
addr_math = _addmm_like(torch.outer, "addr")


# ---- recurrent layers: the gate products of LSTM / GRU, the plain RNN recurrence ------------
def _lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr=None):
    gates = F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, -1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c = f * c + i * g
    h = o * torch.tanh(c)
    if w_hr is not None:
        h = F.linear(h, w_hr)
    return h, c


def _gru_cell(x, h, w_ih, w_hh, b_ih, b_hh):
    ri, zi, ni = F.linear(x, w_ih, b_ih).chunk(3, -1)
    rh, zh, nh = F.linear(h, w_hh, b_hh).chunk(3, -1)
    r = torch.sigmoid(ri + rh)
    z = torch.sigmoid(zi + zh)
    n = torch.tanh(ni + r * nh)
    return (1 - z) * n + z * h


def _rnn_cell(act):
    def cell(x, h, w_ih, w_hh, b_ih, b_hh):
        return act(F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh))
    return cell


def lstm_cell_math(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """``torch.lstm_cell`` (nn.LSTMCell): gates from two F.linear, ``c' = f*c + i*g``,
    ``h' = o * tanh(c')``; returns ``(h', c')``."""
    return _lstm_cell(input, hx[0], hx[1], w_ih, w_hh, b_ih, b_hh)


def gru_cell_math(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """``torch.gru_cell`` (nn.GRUCell): ``n = tanh(W_in x + b_in + r*(W_hn h + b_hn))``,
    ``h' = (1 - z)*n + z*h``."""
    return _gru_cell(input, hx, w_ih, w_hh, b_ih, b_hh)


def rnn_tanh_cell_math(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """``torch.rnn_tanh_cell``: ``tanh(W_ih x + b_ih + W_hh h + b_hh)``."""
    return _rnn_cell(torch.tanh)(input, hx, w_ih, w_hh, b_ih, b_hh)


def rnn_relu_cell_math(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """``torch.rnn_relu_cell``: ``relu(W_ih x + b_ih + W_hh h + b_hh)``."""
    return _rnn_cell(torch.relu)(input, hx, w_ih, w_hh, b_ih, b_hh)


def _recurrent(kind: str):
    """``_VF.lstm`` / ``_VF.gru`` / ``_VF.rnn_tanh`` / ``_VF.rnn_relu`` (what nn.LSTM/GRU/RNN
    call) as an explicit loop over time steps, layers and directions. Dropout between layers
    (train mode) is ``F.dropout`` on each layer's output but the last. Packed sequences are
    refused."""
    def fn(input, hx, *rest):
        if not isinstance(input, Tensor) or (isinstance(hx, Tensor) and not hx.is_floating_point()):
            raise RefusedError(f"oba_ext: nn.{_MODULE_NAME[kind]} on a PackedSequence is "
                               f"not supported; pass a padded tensor")
        params, has_biases, num_layers, dropout, train, bidirectional, batch_first = rest
        dirs = 2 if bidirectional else 1
        per = len(params) // (num_layers * dirs)
        x = input.transpose(0, 1) if batch_first else input  # (T, N, ·)
        if kind == "lstm":
            h0, c0 = hx
        else:
            h0, c0 = hx, None
        h_n, c_n = [], []
        for layer in range(num_layers):
            outs = []
            for d in range(dirs):
                k = layer * dirs + d
                w = list(params[k * per:(k + 1) * per])
                w_ih, w_hh = w[0], w[1]
                b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
                w_hr = w[-1] if kind == "lstm" and per == (5 if has_biases else 3) else None
                h = h0[k]
                c = c0[k] if c0 is not None else None
                steps = range(x.shape[0] - 1, -1, -1) if d == 1 else range(x.shape[0])
                ys = [None] * x.shape[0]
                for t in steps:
                    if kind == "lstm":
                        h, c = _lstm_cell(x[t], h, c, w_ih, w_hh, b_ih, b_hh, w_hr)
                    elif kind == "gru":
                        h = _gru_cell(x[t], h, w_ih, w_hh, b_ih, b_hh)
                    else:
                        h = _rnn_cell(torch.tanh if kind == "rnn_tanh" else torch.relu)(
                            x[t], h, w_ih, w_hh, b_ih, b_hh)
                    ys[t] = h
                outs.append(torch.stack(ys, 0))
                h_n.append(h)
                if c is not None:
                    c_n.append(c)
            x = outs[0] if dirs == 1 else torch.cat(outs, -1)
            if dropout and train and layer < num_layers - 1:
                x = F.dropout(x, dropout, True)
        out = x.transpose(0, 1) if batch_first else x
        if kind == "lstm":
            return out, torch.stack(h_n, 0), torch.stack(c_n, 0)
        return out, torch.stack(h_n, 0)
    fn.__name__ = f"{kind}_math"
    return fn


_MODULE_NAME = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN"}

DECOMPOSITIONS.update({
    F.glu: glu_math,
    torch.addcmul: addcmul_math, Tensor.addcmul: addcmul_math,
    torch.addcdiv: addcdiv_math, Tensor.addcdiv: addcdiv_math,
    F.bilinear: bilinear_math,
    torch.einsum: einsum_math,
    torch.addmm: addmm_math, Tensor.addmm: addmm_math,
    torch.baddbmm: baddbmm_math, Tensor.baddbmm: baddbmm_math,
    torch.addbmm: addbmm_math, Tensor.addbmm: addbmm_math,
    torch.addmv: addmv_math, Tensor.addmv: addmv_math,
    torch.addr: addr_math, Tensor.addr: addr_math,
    torch._VF.lstm: _recurrent("lstm"), torch._VF.gru: _recurrent("gru"),
    torch._VF.rnn_tanh: _recurrent("rnn_tanh"), torch._VF.rnn_relu: _recurrent("rnn_relu"),
    torch._VF.lstm_cell: lstm_cell_math, torch._VF.gru_cell: gru_cell_math,
    torch._VF.rnn_tanh_cell: rnn_tanh_cell_math, torch._VF.rnn_relu_cell: rnn_relu_cell_math,
})


# ---- dropout: one mask per batch, drawn on a plain tensor ------------------------------------
def _dropout_mask(fn, names=("input", "p", "training", "inplace"), defaults=(None, 0.5, True, False)):
    def mask(args, kwargs) -> Optional[Tensor]:
        a = dict(zip(names, defaults))
        a.update(zip(names, args))
        a.update(kwargs)
        x, p, training = a["input"], a["p"], a["training"]
        if not training or p == 0 or not isinstance(x, Tensor):
            return None
        ones = torch.ones(x.shape, dtype=x.dtype, device=x.device)
        return fn(ones, p, True)
    return mask


def _refuse_alpha(name):
    def mask(args, kwargs):
        training = args[2] if len(args) > 2 else kwargs.get("training", False)
        p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
        if training and p > 0:
            raise RefusedError(f"oba_ext: {name} in train mode (p={p}) is not supported; "
                               f"call model.eval() or set p=0")
        return None
    return mask


#: dropout functions -> ``mask(args, kwargs)``: the scaled keep-mask ``F.dropout(ones)`` (same
#: RNG draws as dropping ``input`` itself), or ``None`` when the call is inactive. The oracles
#: apply it as ``input * mask``: forward-mode AD (dual inputs) makes ``F.dropout`` draw a
#: *different* mask than a plain call, so calling the op on the real input would give the
#: tangent pass and the gradient pass different networks. The engine draws the same mask
#: (``oba_ext.engine.rules.random``).
RANDOM_MASKS = {
    F.dropout: _dropout_mask(F.dropout),
    F.dropout1d: _dropout_mask(F.dropout1d),
    F.dropout2d: _dropout_mask(F.dropout2d),
    F.dropout3d: _dropout_mask(F.dropout3d),
    F.alpha_dropout: _refuse_alpha("F.alpha_dropout / nn.AlphaDropout"),
    F.feature_alpha_dropout: _refuse_alpha("F.feature_alpha_dropout / nn.FeatureAlphaDropout"),
}


# ---- products of many factors -----------------------------------------------------------------
def prod_math(input: Tensor, *args, dtype=None, **kwargs) -> Tensor:
    """``torch.prod`` (function and method): the running product of the slices along ``dim``
    (all elements when no dim), each step one elementwise product."""
    dim = args[0] if args else kwargs.get("dim")
    keepdim = args[1] if len(args) > 1 else kwargs.get("keepdim", False)
    x = input if dtype is None else input.to(dtype)
    if dim is None:
        x, dim, keepdim = x.reshape(-1), 0, False
    parts = x.unbind(dim)
    y = parts[0]
    for p in parts[1:]:
        y = y * p
    if len(parts) == 0:
        y = torch.ones(x.shape[:dim] + x.shape[dim + 1:], dtype=x.dtype, device=x.device)
    return y.unsqueeze(dim) if keepdim else y


def cumprod_math(input: Tensor, dim: int, *, dtype=None) -> Tensor:
    """``torch.cumprod``: the running products along ``dim``, stacked."""
    x = input if dtype is None else input.to(dtype)
    parts = x.unbind(dim)
    out, y = [], None
    for p in parts:
        y = p if y is None else y * p
        out.append(y)
    return torch.stack(out, dim)


def multi_dot_math(tensors, *, out=None) -> Tensor:
    """``torch.linalg.multi_dot`` / ``torch.chain_matmul``: left-to-right matmuls."""
    if out is not None:
        raise NotImplementedError("oba_ext: multi_dot(..., out=...) is not supported")
    ts = list(tensors)
    y = ts[0]
    for t in ts[1:]:
        y = torch.matmul(y, t)
    return y


def _chain_matmul_math(*matrices, out=None):
    return multi_dot_math(matrices, out=out)


DECOMPOSITIONS.update({
    torch.prod: prod_math, Tensor.prod: prod_math,
    torch.cumprod: cumprod_math, Tensor.cumprod: cumprod_math,
    torch.linalg.multi_dot: multi_dot_math, torch.chain_matmul: _chain_matmul_math,
})

#: ops with products inside that the oba oracle does not write out: recording them with a
#: θ-dependent operand raises (``taylor``/``exact`` passes run them as they are)
PRODUCT_REFUSALS = {
    torch.linalg.det: "torch.linalg.det", torch.det: "torch.det", Tensor.det: "Tensor.det",
    torch.logdet: "torch.logdet", torch.slogdet: "torch.slogdet",
    torch.linalg.slogdet: "torch.linalg.slogdet", torch.kron: "torch.kron",
    torch.cross: "torch.cross", torch.linalg.cross: "torch.linalg.cross",
    torch.matrix_power: "torch.matrix_power", torch.linalg.matrix_power: "torch.linalg.matrix_power",
    torch.linalg.solve: "torch.linalg.solve", torch.cdist: "torch.cdist (p=2 uses a matmul)",
    torch.linalg.inv: "torch.linalg.inv", torch.inverse: "torch.inverse",
}


# ---------------------------------------------------------------------------------------------
# Embedding lookups: the function the oracles differentiate (SPEC §1: the loss as a function of θ)
# ---------------------------------------------------------------------------------------------

def embedding_lookup(input: Tensor, weight: Tensor, padding_idx: Optional[int] = None,
                     max_norm: Optional[float] = None, norm_type: float = 2.0,
                     scale_grad_by_freq: bool = False, sparse: bool = False):
    """``F.embedding`` (and so ``nn.Embedding``) as the oracles differentiate it.

    input: integer indices of any shape ``(*)``; weight: ``(V, D)``; returns ``(*, D)`` =
    ``weight[input]``, with:

    - ``padding_idx``: the lookup at positions reading that row is a constant (its output
      carries no tangent in forward mode and passes no gradient to the row in reverse mode),
      which is what torch's embedding backward does; torch's forward-mode AD would move it. The
      row itself stays a parameter: where the same tensor is used elsewhere (an LM head tied to
      the embedding) it moves and is scored there.
    - ``sparse=True``: computed with a dense gradient (same values; sparse gradients have no
      double backward and break the products).
    - ``max_norm`` (renormalizes ``weight`` in place during forward) and
      ``scale_grad_by_freq=True`` (a rescaled gradient that is not the derivative of the loss):
      :class:`~oba_ext.errors.RefusedError` (a ``ValueError``) naming the argument, before
      anything is computed.

    Returns ``NotImplemented`` (the call runs as it is) for a plain lookup.
    """
    refuse_embedding_flags(None, max_norm, scale_grad_by_freq)
    if padding_idx is None and not sparse:
        return NotImplemented
    if padding_idx is not None:
        n = weight.size(0)
        if not -n <= padding_idx < n:
            raise ValueError(f"F.embedding: padding_idx={padding_idx} must be within the "
                             f"{n} rows of weight")
        padding_idx = padding_idx + n if padding_idx < 0 else padding_idx
    out = torch.embedding(weight, input, -1, False, False)
    if padding_idx is not None:
        out = torch.where((input == padding_idx).unsqueeze(-1), out.detach(), out)
    return out


def refuse_embedding_flags(module_name: Optional[str], max_norm, scale_grad_by_freq) -> None:
    """:class:`~oba_ext.errors.RefusedError` (a ``ValueError``) for the embedding arguments no
    path scores (see :func:`embedding_lookup`), naming module ``module_name`` (an
    ``nn.Embedding``) or, for None, the ``F.embedding`` call."""
    _refuse_table_flags("Embedding", "F.embedding", module_name, max_norm, scale_grad_by_freq)


def refuse_embedding_bag_flags(module_name: Optional[str], max_norm,
                               scale_grad_by_freq=False) -> None:
    """:class:`~oba_ext.errors.RefusedError` (a ``ValueError``) for the embedding-bag arguments
    no path scores, naming module ``module_name`` (an ``nn.EmbeddingBag``) or, for None, the
    ``F.embedding_bag`` call:
    ``max_norm`` (renormalizes the weight in place during forward) and
    ``scale_grad_by_freq=True`` (torch rescales the weight's gradient by the inverse index
    frequency, which is not the derivative of the loss; the written-out bag,
    :func:`embedding_bag_math`, would silently drop the rescaling)."""
    _refuse_table_flags("EmbeddingBag", "F.embedding_bag", module_name, max_norm,
                        scale_grad_by_freq)


def _refuse_table_flags(kind: str, fn: str, module_name: Optional[str], max_norm,
                        scale_grad_by_freq) -> None:
    """The refusals shared by Embedding and EmbeddingBag (module ``kind``, functional ``fn``)."""
    def who(arg):
        return (f"module {module_name!r} ({kind}, {arg})" if module_name is not None
                else f"{fn}(..., {arg})")
    if max_norm is not None:
        raise RefusedError(f"{who(f'max_norm={max_norm}')} renormalizes its weight in place "
                           f"during forward; scoring would modify the model and differentiate a "
                           f"different function. Set max_norm=None (renormalize the weight once "
                           f"beforehand if needed) to score it")
    if scale_grad_by_freq:
        raise RefusedError(f"{who('scale_grad_by_freq=True')}: torch scales the weight's "
                           f"gradient by the inverse index frequency, which is not the derivative "
                           f"of the loss; set scale_grad_by_freq=False to score it (it changes no "
                           f"forward value)")


_BAG_SIG = inspect.signature(F.embedding_bag)


def embedding_bag_refusal(*args, **kwargs):
    """``F.embedding_bag`` run as it is (``NotImplemented``) after
    :func:`refuse_embedding_bag_flags` (first-order passes: torch's own backward is right)."""
    a = _BAG_SIG.bind(*args, **kwargs)
    refuse_embedding_bag_flags(None, a.arguments.get("max_norm"),
                               a.arguments.get("scale_grad_by_freq", False))
    return NotImplemented


def embedding_bag_math(*args, **kwargs) -> Tensor:
    """``F.embedding_bag`` (and so ``nn.EmbeddingBag``) written out, as the oracles and the
    engine differentiate it (SPEC §8, products inside one op).

    input: integer indices, ``(B, N)`` (B bags of N) or ``(n,)`` with ``offsets`` ``(B,)``
    (``(B+1,)`` with ``include_last_offset``); weight: ``(V, D)``; ``per_sample_weights``: like
    ``input`` (``mode="sum"`` only). Returns ``(B, D)``: per bag, over its entries ``j`` whose
    index is not ``padding_idx``,

        sum:  Σ_j  p_j · weight[i_j]      (p_j = 1 without per_sample_weights)
        mean: Σ_j weight[i_j] / #entries  max: max_j weight[i_j]  (an empty bag gives 0)

    The weighted sum is a product of two values (``p_j ⊙ weight[i_j]``) written as one, so it
    carries OBA curvature when both depend on θ (a per-sample weight computed by a target
    layer and a θ-dependent table); torch's fused kernel has neither forward-mode AD nor a
    double backward for ``per_sample_weights``. ``max_norm``/``scale_grad_by_freq``:
    :func:`refuse_embedding_bag_flags`; nested-tensor input: ``RefusedError``; other
    invalid arguments: ``ValueError`` as ``F.embedding_bag`` raises them.
    """
    a = _BAG_SIG.bind(*args, **kwargs)
    a.apply_defaults()
    p = a.arguments
    refuse_embedding_bag_flags(None, p["max_norm"], p["scale_grad_by_freq"])
    input, weight, offsets = p["input"], p["weight"], p["offsets"]
    psw, mode, pad = p["per_sample_weights"], p["mode"], p["padding_idx"]
    if mode not in ("sum", "mean", "max"):
        raise ValueError(f"F.embedding_bag: mode has to be one of sum, mean or max, got {mode!r}")
    if psw is not None and mode != "sum":
        raise NotImplementedError(f"F.embedding_bag: per_sample_weights is only supported for "
                                  f"mode='sum' (got mode={mode!r})")
    if psw is not None and psw.shape != input.shape:
        raise ValueError(f"F.embedding_bag: per_sample_weights {tuple(psw.shape)} must have the "
                         f"shape of the input {tuple(input.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"F.embedding_bag: weight has to be a 2D Tensor, got {weight.dim()}D")
    if input.is_nested:
        raise RefusedError("oba_ext: F.embedding_bag with a nested-tensor input is not "
                           "supported; pass a 1D input with offsets")
    V = weight.size(0)
    if pad is not None:
        if not -V <= pad < V:
            raise ValueError(f"F.embedding_bag: padding_idx={pad} must be within the {V} rows "
                             f"of weight")
        pad = pad + V if pad < 0 else pad
    dev = input.device
    if input.dim() == 2:
        if offsets is not None:
            raise ValueError("F.embedding_bag: if input is 2D, then offsets has to be None")
        idx, valid, w = input, torch.ones(input.shape, dtype=torch.bool, device=dev), psw
    elif input.dim() == 1:
        if offsets is None or offsets.dim() != 1:
            raise ValueError("F.embedding_bag: offsets has to be a 1D Tensor for a 1D input")
        n, offs = input.numel(), offsets.long()
        if p["include_last_offset"]:
            starts, ends = offs[:-1], offs[1:]
        else:
            starts, ends = offs, torch.cat([offs[1:], offs.new_tensor([n])])
        ends = ends.clamp(max=n)
        lengths = (ends - starts).clamp(min=0)
        L = int(lengths.max()) if lengths.numel() and n else 0
        steps = torch.arange(L, device=dev)
        valid = steps.unsqueeze(0) < lengths.unsqueeze(1)              # (B, L)
        pos = torch.where(valid, starts.unsqueeze(1) + steps, 0)
        idx = input[pos] if n else input.new_zeros(pos.shape)
        w = psw[pos] if psw is not None and n else None
    else:
        raise ValueError(f"F.embedding_bag: input has to be 1D or 2D Tensor, got {input.dim()}D")
    if pad is not None:
        valid = valid & (idx != pad)
    B, D = idx.size(0), weight.size(1)
    if idx.size(1) == 0:  # every bag is empty
        return weight.new_zeros(B, D)
    rows = F.embedding(idx, weight)                                    # (B, L, D)
    if w is not None:
        rows = rows * w.unsqueeze(-1)                                   # the product
    keep = valid.unsqueeze(-1)
    count = valid.sum(1, keepdim=True)                                  # (B, 1)
    if mode == "max":
        top = rows.masked_fill(~keep, float("-inf")).max(dim=1).values
        return torch.where(count > 0, top, torch.zeros((), dtype=top.dtype, device=dev))
    out = torch.where(keep, rows, torch.zeros((), dtype=rows.dtype, device=dev)).sum(1)
    if mode == "mean":
        out = out / count.clamp(min=1).to(out.dtype)
    return out


DECOMPOSITIONS[F.embedding] = embedding_lookup
DECOMPOSITIONS[F.embedding_bag] = embedding_bag_math
