"""Random tiny float64 models over the op grammar the engine supports (issue 10, "prove the kind,
not the example"); used by ``tests/test_random_models.py``.

A model is a chain of *blocks* on a value of one of three shapes (:class:`Shape`): an image
``(B, C, H, W)``, a sequence ``(B, N, C)`` or a vector ``(B, C)``. :func:`generate` draws, from a
seed, a start (:data:`STARTS`: the input and its shape), 1–``max_blocks`` blocks from
:data:`OPS` whose ``kinds`` accept the current shape, and a Linear head to ``K`` classes, plus a
loss (cross-entropy or MSE) and the model's mode. The architecture is a list of short strings
(``Arch.describe()``), printed with the seed on any failure.

Extending the grammar: add one entry to :data:`OPS` (or :data:`STARTS` for a new kind of input,
as ``tokens``: ids into an ``nn.Embedding``)::

    @op("upsample_conv", kinds=("img",))
    def _upsample_conv(r, s):               # r: random.Random, s: the current Shape
        c = r.randint(2, 4)
        m = nn.ConvTranspose2d(s.C, c, 2, stride=2)
        return Wrap(m), Shape("img", c, s.H * 2, s.W * 2), f"ConvTranspose2d({s.C}->{c})"

A builder returns ``(block module, new shape, description)``; blocks are small ``nn.Module`` s
written as research code is (functional ops, ``view``/``transpose``, ``torch.cat``, products),
so ``torch.fx`` traces through them and the engine sees the individual ops. Channel counts stay
at 2–6 so that the full Hessian of all target parameters (brute force) takes well under a second.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Shape:
    kind: str          # "img" (B, C, H, W) | "seq" (B, N, C) | "vec" (B, C)
    C: int
    H: int = 0         # img height, or seq length N
    W: int = 0         # img width


@dataclass
class OpSpec:
    name: str
    kinds: Tuple[str, ...]
    build: Callable     # (random.Random, Shape) -> (nn.Module, Shape, str) or None (not applicable)


OPS: List[OpSpec] = []
STARTS: Dict[str, Callable] = {}


def op(name: str, kinds: Tuple[str, ...]):
    """Register a block builder for the shapes ``kinds``."""
    def deco(fn):
        OPS.append(OpSpec(name, kinds, fn))
        return fn
    return deco


# ------------------------------------------------------------------ blocks
ACTS = {  # name -> (module factory, functional form)
    "relu": (nn.ReLU, F.relu), "gelu": (nn.GELU, F.gelu), "tanh": (nn.Tanh, torch.tanh),
    "sigmoid": (nn.Sigmoid, torch.sigmoid), "silu": (nn.SiLU, F.silu),
    "leaky_relu": (lambda: nn.LeakyReLU(0.1), lambda x: F.leaky_relu(x, 0.1)),
}


class Wrap(nn.Module):
    """A single module as a block."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x)


class Fn(nn.Module):
    """A parameter-free functional block (activation, reshape, pooling)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _dense(r, s: Shape, c_out: int, bias=None):
    """A Linear (vec/seq) or a Conv2d (img) from s.C to c_out channels."""
    bias = r.random() < 0.7 if bias is None else bias
    if s.kind == "img":
        k = r.choice([1, 3])
        g = r.choice([g for g in (1, 2) if s.C % g == 0 and c_out % g == 0])
        return nn.Conv2d(s.C, c_out, k, padding=k // 2, groups=g, bias=bias), \
            f"Conv2d({s.C}->{c_out},k{k},g{g}{',nobias' if not bias else ''})"
    return nn.Linear(s.C, c_out, bias=bias), f"Linear({s.C}->{c_out}{',nobias' if not bias else ''})"


def _act(r):
    name = r.choice(sorted(ACTS))
    mod, fn = ACTS[name]
    return (mod(), name) if r.random() < 0.5 else (Fn(fn), f"F.{name}")


@op("dense", kinds=("img", "seq", "vec"))
def _op_dense(r, s):
    c = r.randint(2, 5)
    m, d = _dense(r, s, c)
    return Wrap(m), Shape(s.kind, c, s.H, s.W), d


@op("act", kinds=("img", "seq", "vec"))
def _op_act(r, s):
    m, d = _act(r)
    return m, s, d


@op("norm", kinds=("img", "seq", "vec"))
def _op_norm(r, s):
    """BatchNorm2d / GroupNorm on images, LayerNorm on ≥ 3 features: LayerNorm over 2 features
    is a smoothed sign function (x̂ = ±d/√(d² + 4ε)) whose gradients below it are ~1e-7 of the
    rest and come from cancellation, so float64 rounding alone (~1e-10 relative, seen between
    brute force and both paths on seed 191) exceeds the test bound; over 1 feature it is a
    constant."""
    if s.kind != "img" and s.C < 3:
        return None
    if s.kind == "img":
        if r.random() < 0.6:
            m, d = nn.BatchNorm2d(s.C), f"BatchNorm2d({s.C})"
            with torch.no_grad():
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        else:
            g = r.choice([g for g in (1, 2) if s.C % g == 0])
            m, d = nn.GroupNorm(g, s.C), f"GroupNorm({g},{s.C})"
    else:
        m, d = nn.LayerNorm(s.C), f"LayerNorm({s.C})"
    with torch.no_grad():
        m.weight.normal_(1.0, 0.3)
        m.bias.normal_(0.0, 0.3)
    return m, s, d


class Residual(nn.Module):
    def __init__(self, a, act, b):
        super().__init__()
        self.a, self.act, self.b = a, act, b

    def forward(self, x):
        return x + self.b(self.act(self.a(x)))


@op("residual", kinds=("img", "seq", "vec"))
def _op_residual(r, s):
    h = r.randint(2, 5)
    a, da = _dense(r, s, h)
    b, db = _dense(r, Shape(s.kind, h, s.H, s.W), s.C)
    act, dact = _act(r)
    return Residual(a, act, b), s, f"x+[{da},{dact},{db}]"


class Concat(nn.Module):
    def __init__(self, a, b, dim):
        super().__init__()
        self.a, self.b, self.dim = a, b, dim

    def forward(self, x):
        return torch.cat([self.a(x), torch.tanh(self.b(x))], dim=self.dim)


@op("concat", kinds=("img", "seq", "vec"))
def _op_concat(r, s):
    c1, c2 = r.randint(1, 3), r.randint(1, 3)
    a, da = _dense(r, s, c1)
    b, db = _dense(r, s, c2)
    dim = 1 if s.kind == "img" else -1
    return Concat(a, b, dim), Shape(s.kind, c1 + c2, s.H, s.W), f"cat[{da},tanh({db})]"


class Product(nn.Module):
    """act1(a(x)) * act2(b(x)): a product of two θ-dependent activations (OBA curvature)."""

    def __init__(self, a, b, f1, f2, chunk, dim):
        super().__init__()
        self.a, self.b, self.f1, self.f2, self.chunk, self.dim = a, b, f1, f2, chunk, dim

    def forward(self, x):
        if self.chunk:  # one layer to 2C, split: a GLU written out
            u, v = self.a(x).chunk(2, dim=self.dim)
        else:
            u, v = self.a(x), self.b(x)
        return self.f1(u) * self.f2(v)


@op("product", kinds=("img", "seq", "vec"))
def _op_product(r, s):
    c = r.randint(2, 4)
    chunk = r.random() < 0.4
    a, da = _dense(r, s, 2 * c if chunk else c)
    b, db = (None, "") if chunk else _dense(r, s, c)
    f1, d1 = _act(r)
    f2, d2 = _act(r)
    d = f"{d1}({da})[:C]*{d2}(..)[C:]" if chunk else f"{d1}({da})*{d2}({db})"
    return Product(a, b, f1, f2, chunk, 1 if s.kind == "img" else -1), Shape(s.kind, c, s.H, s.W), d


class Attention(nn.Module):
    """q/k/v Linears, heads by view/transpose, SDPA or explicit softmax(QKᵀ/√d)V, out Linear."""

    def __init__(self, c, heads, hd, sdpa, causal, bias):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(c, heads * hd, bias=bias) for _ in range(3))
        self.o = nn.Linear(heads * hd, c, bias=bias)
        self.heads, self.hd, self.sdpa, self.causal = heads, hd, sdpa, causal

    def forward(self, x):
        B, N, _ = x.shape
        q = self.q(x).view(B, N, self.heads, self.hd).transpose(1, 2)
        k = self.k(x).view(B, N, self.heads, self.hd).transpose(1, 2)
        v = self.v(x).view(B, N, self.heads, self.hd).transpose(1, 2)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.hd), dim=-1)
            y = a @ v
        return self.o(y.transpose(1, 2).reshape(B, N, self.heads * self.hd))


@op("attention", kinds=("seq",))
def _op_attention(r, s):
    heads, hd = r.choice([1, 2]), r.choice([1, 2])
    sdpa = r.random() < 0.5
    causal = sdpa and r.random() < 0.5
    bias = r.random() < 0.5
    return Attention(s.C, heads, hd, sdpa, causal, bias), s, \
        f"attn(h{heads},d{hd},{'sdpa' if sdpa else 'matmul'}{',causal' if causal else ''})"


@op("mha", kinds=("seq",))
def _op_mha(r, s):
    heads = r.choice([h for h in (1, 2) if s.C % h == 0])
    m = nn.MultiheadAttention(s.C, heads, batch_first=True)

    class MHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = m

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]
    return MHA(), s, f"nn.MultiheadAttention({s.C},h{heads})"


class SeqConv(nn.Module):
    """A Conv1d over the sequence axis: (B, N, C) -> transpose -> Conv1d -> transpose back."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


@op("conv1d", kinds=("seq",))
def _op_conv1d(r, s):
    c, k = r.randint(2, 4), r.choice([1, 3])
    return SeqConv(nn.Conv1d(s.C, c, k, padding=k // 2, bias=r.random() < 0.7)), \
        Shape("seq", c, s.H), f"Conv1d({s.C}->{c},k{k}) over N"


@op("strided", kinds=("img",))
def _op_strided(r, s):
    if s.H < 3 or s.W < 3:
        return None
    c = r.randint(2, 4)
    m = nn.Conv2d(s.C, c, 3, stride=2, padding=1, bias=r.random() < 0.7)
    return Wrap(m), Shape("img", c, (s.H + 1) // 2, (s.W + 1) // 2), f"Conv2d({s.C}->{c},k3,s2)"


SCALARS = {"0.5*x-0.1": lambda x: 0.5 * x - 0.1, "-x/2": lambda x: -x / 2,
           "x*x": lambda x: x * x, "x.sum(-1,keepdim)+x": lambda x: x.sum(-1, keepdim=True) + x}


@op("arith", kinds=("img", "seq", "vec"))
def _op_arith(r, s):
    """Scalar arithmetic (scale, shift, negate, divide), a square (a product of an activation
    with itself) and a broadcast sum."""
    name = r.choice(sorted(SCALARS))
    return Fn(SCALARS[name]), s, name


@op("conv_transpose", kinds=("img",))
def _op_conv_transpose(r, s):
    """ConvTranspose2d: k2/s2 doubles the image (kept small), k3/s1/p1 keeps it."""
    c = r.randint(2, 4)
    if s.H <= 3 and r.random() < 0.5:
        m = nn.ConvTranspose2d(s.C, c, 2, stride=2, bias=r.random() < 0.7)
        return Wrap(m), Shape("img", c, s.H * 2, s.W * 2), f"ConvTranspose2d({s.C}->{c},k2,s2)"
    m = nn.ConvTranspose2d(s.C, c, 3, padding=1, bias=r.random() < 0.7)
    return Wrap(m), Shape("img", c, s.H, s.W), f"ConvTranspose2d({s.C}->{c},k3)"


@op("pool", kinds=("img",))
def _op_pool(r, s):
    if s.H < 2 or s.W < 2:
        return None
    if r.random() < 0.5:
        return nn.MaxPool2d(2), Shape("img", s.C, s.H // 2, s.W // 2), "MaxPool2d(2)"
    return nn.AvgPool2d(2), Shape("img", s.C, s.H // 2, s.W // 2), "AvgPool2d(2)"


@op("to_seq", kinds=("img",))
def _op_to_seq(r, s):
    return Fn(lambda x: x.flatten(2).transpose(1, 2)), Shape("seq", s.C, s.H * s.W), \
        "flatten(2).transpose(1,2)"


@op("to_vec", kinds=("img", "seq"))
def _op_to_vec(r, s):
    if s.kind == "img":
        if r.random() < 0.5:
            return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), Shape("vec", s.C), \
                "AdaptiveAvgPool2d(1),Flatten"
        return Fn(lambda x: x.reshape(x.shape[0], -1)), Shape("vec", s.C * s.H * s.W), "reshape(B,-1)"
    if r.random() < 0.5:
        return Fn(lambda x: x.mean(1)), Shape("vec", s.C), "mean(1)"
    return Fn(lambda x: x.flatten(1)), Shape("vec", s.C * s.H), "flatten(1)"


# ------------------------------------------------------------------ starts
def _start_img(r, g):
    c, h = r.choice([1, 2, 3]), r.choice([3, 4])
    return Shape("img", c, h, h), lambda b: torch.randn(b, c, h, h, generator=g, dtype=torch.float64)


def _start_seq(r, g):
    c, n = r.randint(2, 4), r.randint(2, 4)
    return Shape("seq", c, n), lambda b: torch.randn(b, n, c, generator=g, dtype=torch.float64)


def _start_vec(r, g):
    c = r.randint(2, 5)
    return Shape("vec", c), lambda b: torch.randn(b, c, generator=g, dtype=torch.float64)


def _start_tokens(r, g):
    """Token ids (B, N) into an nn.Embedding (a target layer): a sequence."""
    v, c, n = r.randint(4, 8), r.randint(2, 4), r.randint(2, 4)
    emb = nn.Embedding(v, c)
    return Shape("seq", c, n), lambda b: torch.randint(0, v, (b, n), generator=g), \
        (emb, f"Embedding({v},{c})")


STARTS.update(img=_start_img, seq=_start_seq, vec=_start_vec, tokens=_start_tokens)


# ------------------------------------------------------------------ models
class RandomNet(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


@dataclass
class Arch:
    seed: int
    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    loss: Callable
    loss_name: str
    train: bool
    layers: List[str] = field(default_factory=list)

    def describe(self) -> str:
        mode = "train" if self.train else "eval"
        return (f"seed {self.seed}: input {tuple(self.inputs.shape)} -> " + " -> ".join(self.layers)
                + f"; loss {self.loss_name}; {mode} mode")


def generate(seed: int, max_blocks: int = 4, batch: int = 3, classes: int = 3,
             max_width: int = 12) -> Arch:
    """A random float64 model, its batch and loss, from ``seed`` (deterministic)."""
    r = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # module initializers
    s, make_input, *first = STARTS[r.choice(sorted(STARTS))](r, g)
    blocks, descs = [], []
    if first:  # a start with its own first block (the Embedding of token ids)
        blocks.append(first[0][0])
        descs.append(first[0][1])
    for _ in range(r.randint(1, max_blocks)):
        choices = [o for o in OPS if s.kind in o.kinds]
        for _ in range(20):
            built = r.choice(choices).build(r, s)
            if built is not None and built[1].C * max(built[1].H, 1) * max(built[1].W, 1) \
                    <= max_width * 16:
                break
        else:
            continue
        m, s, d = built
        blocks.append(m)
        descs.append(d)
    if s.kind != "vec":
        m, s, d = _op_to_vec(r, s)
        blocks.append(m)
        descs.append(d)
    if s.C > max_width * 4:  # keep the head's parameter count small
        blocks.append(Fn(lambda x: x[:, :max_width * 4]))
        descs.append(f"x[:, :{max_width * 4}]")
        s = Shape("vec", max_width * 4)
    blocks.append(nn.Linear(s.C, classes))
    descs.append(f"Linear({s.C}->{classes})")
    model = RandomNet(blocks).double()
    train = any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) and r.random() < 0.5
    model.train(train)
    x = make_input(batch)
    if r.random() < 0.7:
        y, loss, lname = torch.randint(0, classes, (batch,), generator=g), F.cross_entropy, "CE"
    else:
        y, loss, lname = torch.randn(batch, classes, generator=g, dtype=torch.float64), \
            F.mse_loss, "MSE"
    return Arch(seed, model, x, y, loss, lname, train, descs)
