"""``"head"`` granularity: one score per attention head, as post-processing of channel scores.

The score of head h is the sum of the head's channel scores (SPEC §5, structured scores are
sums of per-parameter scores, so no cross terms are involved):

    head[h] = Σ_{c ∈ h} (q.out[c] + k.out[c] + v.out[c])  +  Σ_{c ∈ h} proj.in[c]

where channel c = h·head_dim + d (the head-major layout every attention implementation uses
when it splits E into (num_heads, head_dim)). With grouped-query attention (H query heads,
H_kv < H key/value heads, each serving g = H / H_kv query heads, query head h reading kv head
h // g), the k/v score of kv head j is shared equally among its g query heads
(``k.out``/``v.out`` of head j, divided by g), so Σ_h head[h] is the sum of every channel score
of the block. Parts whose layer is not scored (ignored) are left out. It works on the
accumulated ``{layer: {key: sum}}`` of either implementation, before the batch average and any
criterion ``finalize`` (so an L2-norm criterion yields the head's norm), which is why the scorers
are asked for "out" and "in" when "head" is requested.

Where head scores appear: first the layer kind's own layout (``LayerKind.head_layout``,
:mod:`oba_ext.layers`), then the duck-typed :data:`HEAD_PATTERNS` for attention written with
explicit matmuls (classes this package does not import), each under **the attention module's
own name**, an entry of its own holding only ``head`` (unless that module is itself scored):

- ``nn.MultiheadAttention`` ``m`` at ``name``: ``result[name].head``; q/k/v from its own
  "out" (3E,) rows, the output projection from ``name.out_proj``'s "in". The packed in_proj
  already reports ``parts["q.out"|"k.out"|"v.out"]``.
- packed qkv (timm ``Attention``: ``qkv``/``proj``; GPT/nanoGPT/Hugging Face GPT-2:
  ``c_attn``/``c_proj``; ``nn.Linear`` or ``transformers.Conv1D``, E → 3E, and an int
  ``num_heads``/``n_head``): the packed projection also reports
  ``parts["q.out"|"k.out"|"v.out"]``.
- separate projections (Hugging Face LLaMA/Mistral/OPT/BART style: ``q_proj``, ``k_proj``,
  ``v_proj`` Linears, ``o_proj``/``out_proj``/``dense``), with grouped-query attention: query
  heads from ``num_heads``, ``num_attention_heads``, ``config.num_attention_heads`` or
  ``q_proj.out_features // head_dim``; kv heads from ``k_proj.out_features // head_dim``.
- BERT layout (a module with ``self.query``/``self.key``/``self.value`` Linears,
  ``self.num_attention_heads``, and ``output.dense``), under the outer module's name; a bare
  self-attention module (``query``/``key``/``value`` and ``num_attention_heads``) without an
  output projection gets heads from q/k/v alone.

Modules that look like attention (a ``num_heads``/``num_attention_heads``/``n_head``
attribute) but match no layout get no head score; :func:`headless_attention` names them with
the reason, and :func:`add_head_scores` warns once per call listing them.

Keys the user did not ask for ("out"/"in" computed only to form heads) are removed, except the
``parts.{q,k,v}.out`` of packed projections, which belong to the head report.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from torch import Tensor, nn

from .layers import HeadGroup, kind_of

__all__ = ["HeadGroup", "HEAD_PATTERNS", "find_head_groups", "add_head_scores", "helper_keys",
           "headless_attention"]

_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head")


def _join(name: str, child: str) -> str:
    return f"{name}.{child}" if name else child


def _int_attr(m: nn.Module, *names) -> Optional[int]:
    for n in names:
        v = getattr(m, n, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    cfg = getattr(m, "config", None)
    for n in names:
        v = getattr(cfg, n, None) if cfg is not None else None
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _dense_io(m) -> Optional[Tuple[int, int]]:
    """(in, out) features of a dense projection — a target layer of kind "linear" or
    "hf_conv1d" (transformers' Conv1D), read from its kind's shapes — else None."""
    kind = kind_of(m, include_norm=False) if isinstance(m, nn.Module) else None
    if kind is None or kind.name not in ("linear", "hf_conv1d"):
        return None
    return kind.shape(m, "in")[0], kind.shape(m, "out")[0]


def _packed(name: str, m: nn.Module, qkv_attr: str, proj_attr: str) -> Optional[HeadGroup]:
    qkv, proj, H = getattr(m, qkv_attr, None), getattr(m, proj_attr, None), _int_attr(m, *_HEAD_ATTRS)
    qkv_io, proj_io = _dense_io(qkv), _dense_io(proj)
    if qkv_io is None or proj_io is None or not H:
        return None
    E = proj_io[0]
    if qkv_io[1] != 3 * E or E % H:
        return None
    q = _join(name, qkv_attr)
    return HeadGroup(name, H, E, tuple((q, p, i * E, E, H) for i, p in enumerate("qkv")), q,
                     _join(name, proj_attr))


def _timm_layout(name: str, m: nn.Module) -> Optional[HeadGroup]:
    return _packed(name, m, "qkv", "proj")


def _gpt_layout(name: str, m: nn.Module) -> Optional[HeadGroup]:
    return _packed(name, m, "c_attn", "c_proj")


def _separate(name: str, q: nn.Module, k: nn.Module, v: nn.Module, names: Tuple[str, str, str],
              out_name: Optional[str], out: Optional[nn.Module], H: Optional[int],
              head_dim: Optional[int]) -> Optional[HeadGroup]:
    if not all(isinstance(p, nn.Linear) for p in (q, k, v)):
        return None
    E = q.out_features
    if H is None and head_dim:
        H = E // head_dim
    if not H or E % H:
        return None
    hd = E // H
    if k.out_features != v.out_features or k.out_features % hd:
        return None
    H_kv = k.out_features // hd
    if not H_kv or H % H_kv:
        return None
    if out is not None and not (isinstance(out, nn.Linear) and out.in_features == E):
        return None
    widths = ((names[0], "q", E, H), (names[1], "k", k.out_features, H_kv),
              (names[2], "v", v.out_features, H_kv))
    return HeadGroup(name, H, E, tuple((l, p, 0, w, h) for l, p, w, h in widths), None,
                     out_name if out is not None else None)


def _hf_layout(name: str, m: nn.Module) -> Optional[HeadGroup]:
    projs = [getattr(m, a, None) for a in ("q_proj", "k_proj", "v_proj")]
    if not all(isinstance(p, nn.Linear) for p in projs):
        return None
    out_attr = next((a for a in ("o_proj", "out_proj", "dense")
                     if isinstance(getattr(m, a, None), nn.Linear)), None)
    if out_attr is None:
        return None
    return _separate(name, *projs, tuple(_join(name, a) for a in ("q_proj", "k_proj", "v_proj")),
                     _join(name, out_attr), getattr(m, out_attr), _int_attr(m, *_HEAD_ATTRS),
                     _int_attr(m, "head_dim", "attention_head_size"))


def _bert_self(name: str, s: nn.Module, out_name: Optional[str], out: Optional[nn.Module],
               key: str) -> Optional[HeadGroup]:
    projs = [getattr(s, a, None) for a in ("query", "key", "value")]
    H = _int_attr(s, *_HEAD_ATTRS)
    if H is None:
        return None
    g = _separate(key, *projs, tuple(_join(name, a) for a in ("query", "key", "value")),
                  out_name, out, H, None)
    return g


def _bert_layout(name: str, m: nn.Module) -> Optional[HeadGroup]:
    s, o = getattr(m, "self", None), getattr(m, "output", None)
    if isinstance(s, nn.Module) and isinstance(getattr(o, "dense", None), nn.Linear):
        return _bert_self(_join(name, "self"), s, _join(name, "output.dense"), o.dense, name)
    if isinstance(getattr(m, "query", None), nn.Linear):
        return _bert_self(name, m, None, None, name)
    return None


#: duck-typed layouts tried in order for modules whose kind has no head layout
HEAD_PATTERNS: List[Callable[[str, nn.Module], Optional[HeadGroup]]] = [
    _timm_layout, _gpt_layout, _hf_layout, _bert_layout]


def _layout_for(name: str, m: nn.Module) -> Optional[HeadGroup]:
    kind = kind_of(m)
    if kind is not None and kind.head_layout is not None:
        return kind.head_layout(name, m)
    for fn in HEAD_PATTERNS:
        g = fn(name, m)
        if g is not None:
            return g
    return None


def _scan(model: nn.Module):
    groups, headless, covered = [], [], set()
    for name, m in model.named_modules():
        if any(name == c or name.startswith(c + ".") for c in covered):
            continue  # inside a block already found (BERT's inner self-attention)
        g = _layout_for(name, m)
        if g is not None:
            groups.append(g)
            covered.add(name)
        elif _int_attr(m, *_HEAD_ATTRS) is not None and kind_of(m) is None:
            headless.append((name, _why_headless(m)))
    # a container whose head count is only its config's (GPT2LMHeadModel, GPT2Model) is not an
    # attention block of its own when attention blocks were found inside it
    headless = [(n, why) for n, why in headless
                if not any(g.key == n or (g.key.startswith(n + ".") if n else True)
                           for g in groups)]
    return groups, headless


def _why_headless(m: nn.Module) -> str:
    lin = [n for n, c in m.named_children() if isinstance(c, nn.Linear)]
    other = [f"{n} ({type(c).__name__})" for n, c in m.named_children()
             if not isinstance(c, nn.Linear) and any(True for _ in c.parameters())]
    why = (f"{type(m).__name__} has a head count but no known q/k/v + output projection layout "
           f"(nn.Linear children: {lin or 'none'}")
    if other:
        why += f"; other parametrized children: {other}, not target layers"
    return why + ")"


def find_head_groups(model: nn.Module) -> List[HeadGroup]:
    """Every attention block of ``model`` whose head layout is known (outermost first)."""
    return _scan(model)[0]


def headless_attention(model: nn.Module) -> List[Tuple[str, str]]:
    """``[(module name, reason)]`` for modules that look like attention (an int
    ``num_heads``/``num_attention_heads``/``n_head``) but whose heads cannot be located."""
    return _scan(model)[1]


def helper_keys(gran: Sequence[str]) -> Tuple[str, ...]:
    """Extra scorer keys needed to form heads: "out" and "in" when "head" is requested."""
    return ("out", "in") if "head" in gran else ()


def _per_head(v: Tensor, heads: int, H: int) -> Tensor:
    """(heads·head_dim,) -> (H,): per-head sums; a kv head serving g = H/heads query heads is
    shared equally among them."""
    s = v.reshape(heads, -1).sum(1)
    if heads == H:
        return s
    g = H // heads
    return (s / g).repeat_interleave(g)


def _wanted(key: str, gran: Sequence[str]) -> bool:
    base = key.rsplit(".", 1)[-1] if key.startswith("parts.") else key
    if base in ("weight", "bias"):
        return "weight" in gran
    if key.startswith("parts.") and base == "out" and "head" in gran:
        return True
    return base in gran


def add_head_scores(model: nn.Module, layers, sums: Dict[str, Dict[str, Tensor]],
                    gran: Sequence[str]) -> Dict[str, Dict[str, Tensor]]:
    """``sums``: ``{layer: {key: tensor}}`` (accumulated channel scores of either
    implementation). Returns a new dict with ``head`` entries (and ``parts.{q,k,v}.out`` of
    packed projections) added when "head" is in ``gran``, and helper keys removed. Warns
    (``UserWarning``) naming attention-like modules that get no head score, and why."""
    out = {name: dict(d) for name, d in sums.items()}
    if "head" in gran:
        groups, headless = _scan(model)
        if not groups and not headless:
            warnings.warn(f"granularity='head': {type(model).__name__} has no attention module "
                          f"(no module with a head count), so there are no head scores",
                          stacklevel=3)
        if headless:
            warnings.warn("granularity='head': no head scores for "
                          + "; ".join(f"{n!r}: {why}" for n, why in headless), stacklevel=3)
        for g in groups:
            terms = []
            for layer, part, off, width, heads in g.qkv:
                s = out.get(layer, {}).get("out")
                if s is None:
                    continue
                chunk = s[off:off + width]
                terms.append(_per_head(chunk, heads, g.num_heads))
                if g.packed == layer:
                    out[layer][f"parts.{part}.out"] = chunk
            s = out.get(g.out_in, {}).get("in") if g.out_in else None
            if s is not None:
                terms.append(_per_head(s, g.num_heads, g.num_heads))
            if terms:
                head = terms[0]
                for t in terms[1:]:
                    head = head + t
                out.setdefault(g.key, {})["head"] = head
    return {name: {k: v for k, v in d.items() if _wanted(k, gran)} for name, d in out.items()}
