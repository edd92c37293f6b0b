"""``"head"`` granularity: one score per attention head, as post-processing of channel scores.

The score of head h is the sum of the head's channel scores (SPEC §5, structured scores are
sums of per-parameter scores, so no cross terms are involved):

    head[h] = Σ_{c ∈ h} (q.out[c] + k.out[c] + v.out[c])  +  Σ_{c ∈ h} proj.in[c]

where channel c = h·head_dim + d (the head-major layout every attention implementation uses
when it splits E into (num_heads, head_dim)). Parts whose layer is not scored (ignored) are
left out. It works on the accumulated ``{layer: {key: sum}}`` of either implementation, before
the batch average and any criterion ``finalize`` (so an L2-norm criterion yields the head's
norm), which is why the scorers are asked for "out" and "in" when "head" is requested.

Where head scores appear (:data:`HEAD_LAYOUTS`, looked up along the module's MRO, then the
duck-typed :data:`HEAD_PATTERNS` for classes this package cannot import):

- ``nn.MultiheadAttention`` ``m`` at ``name``: ``result[name].head``; q/k/v from its own
  "out" (3E,) rows, the output projection from ``name.out_proj``'s "in". The packed in_proj
  already reports ``parts["q.out"|"k.out"|"v.out"]``.
- timm-style attention (a module with ``qkv: nn.Linear`` (E → 3E), ``proj: nn.Linear`` and an
  int ``num_heads``; timm's ``Attention``): ``result[name].head`` under **the attention
  module's own name** (e.g. ``"blocks.0.attn"``), an entry of its own with only ``head``;
  the packed ``name.qkv`` Linear also reports ``parts["q.out"|"k.out"|"v.out"]``.
- Hugging Face-style attention (``q_proj``, ``k_proj``, ``v_proj`` Linears, ``o_proj`` or
  ``out_proj``, and ``num_heads``), with as many key/value heads as query heads:
  ``result[name].head`` under the module's name.

Keys the user did not ask for ("out"/"in" computed only to form heads) are removed, except the
``parts.{q,k,v}.out`` of packed projections, which belong to the head report.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["HeadGroup", "HEAD_LAYOUTS", "HEAD_PATTERNS", "find_head_groups", "add_head_scores",
           "helper_keys"]


@dataclass(frozen=True)
class HeadGroup:
    """One attention block: where its head score goes and which channel scores form it.

    key: the result entry that receives ``head``.
    num_heads: H.
    qkv: ``(layer name, part, offset)``: the q/k/v out-channel scores are
        ``sums[layer]["out"][offset : offset + E]``; ``part`` ("q", "k", "v") names them.
    packed: layer that should also report ``parts.{q,k,v}.out`` (a packed qkv Linear), or None.
    out_in: layer whose "in" channels (E,) are the heads' outputs (output projection), or None.
    """

    key: str
    num_heads: int
    embed_dim: int
    qkv: Tuple[Tuple[str, str, int], ...]
    packed: Optional[str]
    out_in: Optional[str]


def _join(name: str, child: str) -> str:
    return f"{name}.{child}" if name else child


def _mha_layout(name: str, m: nn.MultiheadAttention) -> Optional[HeadGroup]:
    E = m.embed_dim
    return HeadGroup(name, m.num_heads, E, tuple((name, p, i * E) for i, p in enumerate("qkv")),
                     None, _join(name, "out_proj"))


def _timm_layout(name: str, m: nn.Module) -> Optional[HeadGroup]:
    qkv, proj, H = getattr(m, "qkv", None), getattr(m, "proj", None), getattr(m, "num_heads", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(H, int)):
        return None
    E = proj.in_features
    if qkv.out_features != 3 * E or E % H:
        return None
    q = _join(name, "qkv")
    return HeadGroup(name, H, E, tuple((q, p, i * E) for i, p in enumerate("qkv")), q,
                     _join(name, "proj"))


def _hf_layout(name: str, m: nn.Module) -> Optional[HeadGroup]:
    H = getattr(m, "num_heads", None)
    projs = [getattr(m, a, None) for a in ("q_proj", "k_proj", "v_proj")]
    out = getattr(m, "o_proj", None)
    out_attr = "o_proj"
    if out is None:
        out, out_attr = getattr(m, "out_proj", None), "out_proj"
    if not (isinstance(H, int) and all(isinstance(p, nn.Linear) for p in projs)
            and isinstance(out, nn.Linear)):
        return None
    E = out.in_features
    if any(p.out_features != E for p in projs) or E % H:
        return None  # grouped-query attention: k/v heads differ from query heads
    return HeadGroup(name, H, E, tuple((_join(name, a), p, 0) for a, p in
                                       zip(("q_proj", "k_proj", "v_proj"), "qkv")),
                     None, _join(name, out_attr))


#: module class -> layout (MRO lookup)
HEAD_LAYOUTS: Dict[type, Callable[[str, nn.Module], Optional[HeadGroup]]] = {
    nn.MultiheadAttention: _mha_layout,
}
#: duck-typed layouts tried in order for modules without a class entry
HEAD_PATTERNS: List[Callable[[str, nn.Module], Optional[HeadGroup]]] = [_timm_layout, _hf_layout]


def _layout_for(name: str, m: nn.Module) -> Optional[HeadGroup]:
    for cls in type(m).__mro__:
        fn = HEAD_LAYOUTS.get(cls)
        if fn is not None:
            return fn(name, m)
    for fn in HEAD_PATTERNS:
        g = fn(name, m)
        if g is not None:
            return g
    return None


def find_head_groups(model: nn.Module) -> List[HeadGroup]:
    """Every attention block of ``model`` whose head layout is known."""
    out = []
    for name, m in model.named_modules():
        g = _layout_for(name, m)
        if g is not None:
            out.append(g)
    return out


def helper_keys(gran: Sequence[str]) -> Tuple[str, ...]:
    """Extra scorer keys needed to form heads: "out" and "in" when "head" is requested."""
    return ("out", "in") if "head" in gran else ()


def _per_head(v: Tensor, H: int) -> Tensor:
    return v.reshape(H, -1).sum(1)


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
    packed projections) added when "head" is in ``gran``, and helper keys removed."""
    out = {name: dict(d) for name, d in sums.items()}
    if "head" in gran:
        for g in find_head_groups(model):
            terms = []
            for layer, part, off in g.qkv:
                s = out.get(layer, {}).get("out")
                if s is None:
                    continue
                chunk = s[off:off + g.embed_dim]
                terms.append(_per_head(chunk, g.num_heads))
                if g.packed == layer:
                    out[layer][f"parts.{part}.out"] = chunk
            s = out.get(g.out_in, {}).get("in") if g.out_in else None
            if s is not None:
                terms.append(_per_head(s, g.num_heads))
            if terms:
                head = terms[0]
                for t in terms[1:]:
                    head = head + t
                out.setdefault(g.key, {})["head"] = head
    return {name: {k: v for k, v in d.items() if _wanted(k, gran)} for name, d in out.items()}
