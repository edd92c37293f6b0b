"""Every numeric tolerance of the test suite, and the kernel-vs-reference rule of SPEC §7.

Errors are relative Frobenius errors ``‖x − ref₆₄‖ / ‖ref₆₄‖`` against the float64 reference
computed from the *same* (already rounded) inputs, so input rounding is not counted.

float64 (``FLOAT64_RTOL``): every tensor matches its float64 oracle to 1e-10, absolutely.

float32 / float16 / bfloat16 — the *reduced-precision rule* (``assert_matches``)
--------------------------------------------------------------------------------
SPEC §7: the kernel's error may be at most ``FACTOR`` (2) × the error of the pure-PyTorch twin
run in the same dtype. Both errors are *samples*: rounding errors depend on the reduction order,
which differs between BLAS builds, thread counts and algorithms. The old rule
(2 × one twin sample + a 1e-6 floor) flaked (4.68e-6 > 4.59e-6 on a 3-element tensor) and was
loose (the floor is 17 ulps: a kernel 5–50× worse than its twin passed). The rule now bounds
the sampling noise instead of adding a floor:

- Model. The per-element errors ``d_i`` of a float32 computation are zero-mean with variances
  ``σ_i²`` set by the data (size, conditioning) and scaled by the algorithm's accuracy. For a
  tensor whose error is spread over ``ν = (Σσ_i²)² / Σσ_i⁴`` independent components ("effective
  number of elements"), ``‖d‖²`` is ≈ ``σ² χ²_ν``; the ratio of the kernel's and the twin's
  squared errors is then F-distributed: ``(e_k/σ_k)² / (e_t/σ_t)² ~ F(ν_k, ν_t)``.
- Rule. ``e_k ≤ FACTOR · e_t · sqrt(F⁻¹(1 − ALPHA; ν_k, ν_t))``: a kernel at most FACTOR× as
  inaccurate as its twin fails with probability ≤ ALPHA = 1e-6 per tensor (stable: ~1000
  tensors per suite run × 40 runs stays ≤ 4% total at worst, and the bound is typically far
  from the tail), while a kernel 5× worse than its twin fails wherever the data can tell 5×
  from 2× (``ν`` ≳ 20: the multiplier is 3.3 at ν = 20, 2.3 at ν = 300). For a 1–3-element
  tensor no single sample can tell them apart and the multiplier is large; such tensors are
  checked for strictness in bulk by ``assert_matches_pooled`` (all tensors of a model at once).
- ``ν`` is estimated from the twin's own errors, ``ν̂ = (Σd_i²)² / Σd_i⁴`` (for Gaussian
  errors this *under*-estimates ν ≈ 3-fold, which is the conservative side and also absorbs
  correlations between elements' errors); never from the kernel's errors (a kernel with one
  wild element must not widen its own bound). Several twin samples (the same twin on
  reordered inputs: other legitimate rounding) may be passed; their dofs add up in ``ν_t``
  and the twin error used is their RMS.
- Floor: only where every twin sample is *exact* (``e_t = 0``): ``FLOOR_ULPS`` units of the
  dtype's roundoff (a kernel that rounds its float64 accumulator once is within ½ ulp).

The strictness (5× noise fails) and stability (seeds × threads × 20 repetitions, no failure)
of this rule are tests: ``tests/test_tolerances.py``.
"""
from __future__ import annotations

import functools
import math
from typing import Iterable, Optional, Sequence, Tuple, Union

import torch

FLOAT64_RTOL = 1e-10     # SPEC §7: float64 relative Frobenius error, per tensor
FACTOR = 2.0             # SPEC §7: kernel error ≤ FACTOR × twin error (reduced precision)
ALPHA = 1e-6             # false-alarm probability per tensor of the reduced-precision rule
FLOOR_ULPS = 4.0         # floor (only for an exact twin), in units of the dtype's roundoff

#: unit roundoff u = 2^-p of each reduced-precision dtype (half an ulp at 1)
UNIT_ROUNDOFF = {
    torch.float32: 2.0 ** -24,
    torch.float16: 2.0 ** -11,
    torch.bfloat16: 2.0 ** -8,
}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x64, r64 = x.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    den = torch.linalg.vector_norm(r64).item()
    num = torch.linalg.vector_norm(x64 - r64).item()
    return num / den if den > 0 else num


def _diff_summary(x: torch.Tensor, ref: torch.Tensor) -> str:
    d = (x.detach().to(torch.float64).cpu() - ref.detach().to(torch.float64).cpu()).abs()
    if d.numel() == 0:
        return "empty"
    return f"max|diff| = {d.max().item():.3e}, mean|diff| = {d.mean().item():.3e}"


def effective_dof(err: torch.Tensor) -> float:
    """``(Σ d²)² / Σ d⁴`` of the per-element errors ``err`` (float64): the number of elements
    the error is spread over (n for equal errors, 1 for one wild element, 0 for no error)."""
    d2 = err.detach().to(torch.float64).cpu().reshape(-1) ** 2
    s2 = d2.sum().item()
    s4 = (d2 * d2).sum().item()
    return s2 * s2 / s4 if s4 > 0 else 0.0


@functools.lru_cache(maxsize=4096)
def _f_quantile(nu_k: float, nu_t: float) -> float:
    from scipy.stats import f
    return float(f.ppf(1.0 - ALPHA, nu_k, nu_t))


def noise_multiplier(nu_k: float, nu_t: float) -> float:
    """``sqrt(F⁻¹(1 − ALPHA; ν_k, ν_t))``: how far above FACTOR × the twin's error the
    kernel's error may land by the chance of the rounding pattern alone (dofs rounded down
    to 1/8 for caching; a dof below 1 counts as 1)."""
    nu_k = max(1.0, math.floor(nu_k * 8) / 8)
    nu_t = max(1.0, math.floor(nu_t * 8) / 8)
    return math.sqrt(_f_quantile(nu_k, nu_t))


TwinArg = Union[None, torch.Tensor, Sequence[torch.Tensor]]


def reduced_precision_bound(ref64: torch.Tensor, twins: TwinArg,
                            dtype: torch.dtype) -> Tuple[float, float, float, float]:
    """``(bound, twin_err, nu_k, nu_t)`` of the reduced-precision rule (module docstring) for
    the twin sample(s) ``twins`` (a tensor or a sequence of tensors) against ``ref64``."""
    ts = [twins] if isinstance(twins, torch.Tensor) else list(twins)
    assert ts, "the reduced-precision rule needs at least one twin sample"
    r64 = ref64.detach().to(torch.float64).cpu()
    den = torch.linalg.vector_norm(r64).item()
    errs, dofs = [], []
    for t in ts:
        assert t.shape == ref64.shape, f"twin shape {tuple(t.shape)} != {tuple(ref64.shape)}"
        d = t.detach().to(torch.float64).cpu() - r64
        num = torch.linalg.vector_norm(d).item()
        errs.append(num / den if den > 0 else num)
        dofs.append(effective_dof(d))
    twin_err = math.sqrt(sum(e * e for e in errs) / len(errs))
    if twin_err == 0.0:
        return FLOOR_ULPS * UNIT_ROUNDOFF[dtype], 0.0, 0.0, 0.0
    nu_k, nu_t = dofs[0], sum(dofs)
    return FACTOR * twin_err * noise_multiplier(nu_k, nu_t), twin_err, nu_k, nu_t


def assert_matches(out: torch.Tensor, ref64: torch.Tensor, twin_same_dtype: TwinArg = None,
                   dtype: torch.dtype = torch.float64, what: str = "") -> None:
    """Assert the kernel result ``out`` obeys SPEC §7's rule for ``dtype`` (the inputs' dtype).

    ``ref64``: the float64 reference; ``twin_same_dtype``: the twin run in ``dtype`` (a tensor,
    or several samples of it on reordered inputs), needed for every dtype but float64.
    float64: relative error ≤ FLOAT64_RTOL. Otherwise: the reduced-precision rule of the
    module docstring. Failures print the errors, dofs and max/mean differences.
    """
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values in the kernel result"
    err = rel_err(out, ref64)
    if dtype == torch.float64:
        assert err <= FLOAT64_RTOL, (f"{what} [float64]: relative error {err:.3e} > "
                                     f"{FLOAT64_RTOL:.0e}; {_diff_summary(out, ref64)}")
        return
    assert twin_same_dtype is not None, f"{what}: the {dtype} rule needs the twin's result"
    bound, twin_err, nu_k, nu_t = reduced_precision_bound(ref64, twin_same_dtype, dtype)
    assert err <= bound, (
        f"{what} [{dtype}]: relative error {err:.3e} > bound {bound:.3e} = {FACTOR:g} × twin's "
        f"error {twin_err:.3e} × noise multiplier (dof ν_k={nu_k:.1f}, ν_t={nu_t:.1f}); kernel: "
        f"{_diff_summary(out, ref64)}")


def assert_matches_pooled(items: Iterable[Tuple[str, torch.Tensor, torch.Tensor, TwinArg]],
                          dtype: torch.dtype, what: str = "") -> int:
    """The reduced-precision rule per tensor, then once more on all ``items`` pooled.

    ``items``: ``(name, out, ref64, twin)`` tuples (one twin sample each). Small tensors
    (a bias, a 3-channel score) cannot resolve FACTOR× from 5× on their own; pooled, the
    squared errors of all tensors — each normalised by its reference norm, so every tensor
    weighs as its *relative* error — form one sample with the summed dof. Tensors whose twin
    is exact are left out of the pool (the floor covers them). Returns the number of tensors.
    """
    items = list(items)
    sk = st = 0.0
    d_all = []
    for name, out, ref64, twin in items:
        assert_matches(out, ref64, twin, dtype=dtype, what=f"{what}{name}")
        r64 = ref64.detach().to(torch.float64).cpu()
        den = torch.linalg.vector_norm(r64).item()
        dt = (twin.detach().to(torch.float64).cpu() - r64)
        if den == 0 or not dt.any():
            continue
        dk = out.detach().to(torch.float64).cpu() - r64
        sk += (torch.linalg.vector_norm(dk).item() / den) ** 2
        st += (torch.linalg.vector_norm(dt).item() / den) ** 2
        d_all.append(dt.reshape(-1) / den)
    if st > 0:
        nu = effective_dof(torch.cat(d_all))
        bound = FACTOR * math.sqrt(st) * noise_multiplier(nu, nu)
        assert math.sqrt(sk) <= bound, (
            f"{what}pooled over {len(d_all)} tensors [{dtype}]: RMS-summed relative error "
            f"{math.sqrt(sk):.3e} > bound {bound:.3e} = {FACTOR:g} × twin's {math.sqrt(st):.3e} "
            f"× noise multiplier (dof {nu:.1f})")
    return len(items)


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, what: str,
                     rtol: float = FLOAT64_RTOL) -> None:
    """Oracle-vs-brute-force check in float64: relative Frobenius error ≤ ``rtol`` (SPEC §7),
    refusing an all-zero brute-force value (that would make the check vacuous)."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert want.abs().max() > 0, f"{what}: the brute-force value is all zero (a vacuous check)"
    err = rel_err(got, want)
    assert err <= rtol, (f"{what}: relative Frobenius error {err:.3e} > {rtol:.0e} "
                         f"({_diff_summary(got, want)})")


# ------------------------------------------------------------------------------------------
# The tolerance table. Every numeric tolerance of tests/ is named here, with its reason.
# ------------------------------------------------------------------------------------------

#: Analytically zero quantities — the ONLY float64 scores not held to FLOAT64_RTOL per tensor.
#: Their computed values are float64 rounding of terms that cancel exactly, so a relative error
#: against them measures nothing. They are held to FLOAT64_RTOL relative to the *layer's*
#: scale (the norm of all the layer's scores of that quantity), and must themselves be
#: ≤ ANALYTIC_ZERO_MAX of that scale (so calling a wrong value "analytically zero" fails).
ANALYTIC_ZERO = {
    "bn_train": "out-channel and bias scores (oba; exact and taylor alike) of a Linear/Conv "
                "whose output feeds a train-mode BatchNorm: BN normalizes each channel by the "
                "batch's own statistics, so scaling the channel's weights+bias changes nothing "
                "(SPEC §7.3); the sum over the channel cancels up to BN's ε/var.",
    "attn_k_bias": "the bias of an attention's k projection (in_proj_bias[k], k.bias): q·b_k "
                   "shifts every key's logit of a query by the same amount and softmax is "
                   "shift-invariant, so every score of it is 0.",
}
ANALYTIC_ZERO_MAX = 1e-4   # ‖analytically-zero value‖ / layer scale: observed ~1e-7 (BN ε/var)

# Named tolerances (float64 unless said otherwise). "Same formula" = two evaluations of the same
# mathematical expression in float64 whose only difference is summation order.
F64_SAME_FORMULA = 1e-12   # kernel vs naive loop, all-reduce vs single process, attention twin
                           # vs autograd, emulated CUDA recurrences: observed ≤ 1e-14
F64_REORDERED_SUM = 1e-15  # the same scores from other batches of identical content
F64_FORWARD = 1e-14        # forward outputs of two equal networks (in-place vs out-of-place)
F32_EQUAL_NETWORKS = 1e-5  # float32 outputs of two algebraically equal networks (OBC's
                           # equivalent pruning after merging; the brief's bound)
F32_IDENTITY_INSERT = 1e-6 # float32 outputs before/after inserting identity compressors
F32_VS_F64_SCORES = 1e-4   # float32 scoring vs float64 scoring of the same tiny model: float32
                           # rounding of a ~10-layer sweep (observed ~1e-6)
F32_PIXELS = 1e-3          # CIFAR pixels /255 stored as float32 vs the raw bytes (1/255 = 4e-3)
FD_STEP = 1e-3             # step h of the finite differences / channel scalings (benchmarks)
FD_RTOL = 1e-4             # central second difference vs the analytic value: O(h²) = 1e-6
FD_ABS = 1e-9              # ... plus its rounding: u·|L| / h² ≈ 1e-10 (float64)
DELTA_LOSS_RTOL = 1e-2     # ΔL of scaling one channel by (1−ε) vs −ε·taylor: O(ε) relative ...
DELTA_LOSS_REMAINDER = 1e2 # ... plus the second-order remainder, ≤ this × ε² × max|exact score|
DELTA_LOSS_SUM_RTOL = 2e-2 # all channels scaled: ΔL − first − second order vs second: O(ε)
F64_MERGED_ORDER = 1e-15   # the same float64 scores from batches of identical content
F32_REORDERED = 1e-5       # float32 scores summed in another order (CLI: all-reduce over 2
                           # ranks vs one process): ~100 roundings of ~u = 6e-8
F32_ACCUMULATE = 1e-5      # channel_score_reduce_add_ with a float32 accumulator or inputs:
                           # 2 accumulations of ~100-term float32 sums (observed ~1e-7)
F32_IMPORTANCE = 1e-6      # OBAImportance (float32 model) vs the same recipe recomputed in
                           # float32 by the test: a few roundings of a normalized sum
SPARSITY_ROUNDING = 1e-3   # achieved vs requested unstructured sparsity: whole weights round it
BN_TRAIN_OUT_MAX = 1e-5    # train-mode BN (default ε): max |out-channel oba| / Σ|per-weight oba|
                           # (ε/var breaks the scale invariance: observed ~1e-7)
BN_TINY_EPS = 1e-14        # a BN ε so small that scale invariance is exact to float64 ...
BN_TINY_EPS_VANISH = 1e-9  # ... and the out-channel scores vanish to ~1e-12 of the eval ones
BN_DEFAULT_EPS_VANISH = 1e-3  # with ε = 1e-5 they vanish to ~ε/var of the eval-mode scores
NOT_EQUAL_RTOL = 1e-6      # "these two quantities differ": a difference above rounding
SURVIVES = 1e-3            # "this score is not (nearly) zero": ≥ this × the reference size
DEGENERATE = 1e-8          # a brute-force value this small would make the comparison vacuous

def assert_f64(got: torch.Tensor, want: torch.Tensor, what: str,
               analytic_zero: Optional[str] = None, layer_scale: float = 0.0) -> None:
    """float64 score vs oracle: relative Frobenius error ≤ FLOAT64_RTOL per tensor (SPEC §7).

    ``analytic_zero``: a key of ANALYTIC_ZERO when the caller knows ``want`` is analytically
    zero; then the error is measured against ``layer_scale`` (the layer's score norm), and
    ``want`` must indeed be ≤ ANALYTIC_ZERO_MAX × ``layer_scale``.
    """
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if analytic_zero is None:
        err = rel_err(got, want)
        assert err <= FLOAT64_RTOL, (f"{what}: relative error {err:.3e} > {FLOAT64_RTOL:.0e} "
                                     f"({_diff_summary(got, want)})")
        return
    assert analytic_zero in ANALYTIC_ZERO, f"{what}: {analytic_zero!r} is not in ANALYTIC_ZERO"
    assert layer_scale > 0, f"{what}: an analytically-zero value needs the layer's scale"
    size = want.norm().item() / layer_scale
    assert size <= ANALYTIC_ZERO_MAX, (f"{what}: claimed analytically zero ({analytic_zero}) but "
                                       f"‖value‖ = {size:.3e} of the layer's scale")
    err = (got - want).norm().item() / layer_scale
    assert err <= FLOAT64_RTOL, (f"{what} (analytically zero, {analytic_zero}): error {err:.3e} "
                                 f"of the layer's scale > {FLOAT64_RTOL:.0e}")


def train_bn_fed_layers(model: torch.nn.Module) -> set:
    """Names of the Linear/Conv modules whose output goes straight into a BatchNorm module in
    train mode (ANALYTIC_ZERO["bn_train"]); found with torch.fx."""
    import torch.fx
    from torch import nn
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
               for m in model.modules()):
        return set()  # nothing to find (and no need to trace: fx cannot trace every model)
    gm = torch.fx.symbolic_trace(model)
    mods = dict(gm.named_modules())
    out = set()
    for node in gm.graph.nodes:
        m = mods.get(node.target) if node.op == "call_module" else None
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            src = node.args[0]
            if src.op == "call_module" and isinstance(mods[src.target], (nn.Linear, nn.Conv1d,
                                                                        nn.Conv2d)):
                out.add(src.target)
    return out


#: float16/bfloat16 inputs, scores accumulated in float32 (tests/test_half_precision.py): relative
#: error against float64 on the same rounded inputs. Products of 16-bit values are exact in
#: float32, so only float32 summation rounding remains (~√n·6e-8 ≈ 4e-6 of each stream's sum of
#: n ≈ 4096 terms), amplified ~100× by the deliberate cancellation of those tests (the result is
#: ~1e-2 of its terms): up to ~4e-4 (1.5e-4 measured, CPU conv wgrad). 16-bit accumulation
#: loses more than 1e-2 on the same sizes (each test asserts that too), 10× this bound.
HALF_INPUT_FLOAT32_RTOL = 1e-3

# ---------------------------------------------------------------------------------------------
# Named thresholds of the newer test files (moved here so this table stays the only place)
# ---------------------------------------------------------------------------------------------
#: A brute-force tensor whose norm is ≤ this × the model's (or the product's) overall scale is
#: zero by structure (key biases under softmax shift invariance, Ĥv at a last bias where C = 0):
#: it is compared *absolutely* against the scale, to FLOAT64_RTOL, instead of relatively.
#: Structural zeros come out at rounding level (~1e-17 of the scale); real values are ≥ 1e-6.
ZERO_BY_STRUCTURE = 1e-9
#: The same for one tensor of an hvp against the whole product's norm (brute force puts such
#: tensors at ~1e-16 of it; a stricter cut than ZERO_BY_STRUCTURE because products are compared
#: per tensor across very different layers).
ZERO_IN_PRODUCT = 1e-13
#: The same float32 formula evaluated twice in a different order (a Torch-Pruning group
#: importance vs the hand-computed mean of float32 channel scores): a few float32 ulps.
FLOAT32_SAME_FORMULA_RTOL = 1e-6
#: float64 values that must agree to rounding (two exact routes to the same number).
FLOAT64_SAME_FORMULA_RTOL = 1e-12
#: float32 attention rows: the emulated 32-lane (xor-butterfly) sums and the serial sums add
#: the same ≤ 70 terms in another order: ~√70 · 6e-8 relative, plus an absolute term for rows
#: whose sum cancels to ~0.
WARP_VS_SERIAL_RTOL, WARP_VS_SERIAL_ATOL = 1e-5, 1e-6
#: A symmetric PSD matrix built in float64: its smallest eigenvalue may be negative by rounding
#: only, ≤ this × max|entry|.
PSD_ROUNDING = 1e-10
#: eigsh's convergence tolerance in the Lanczos test (a solver setting, far below FLOAT64_RTOL
#: so the solver's own error does not count against the comparison).
EIGSH_TOL = 1e-12
#: What the old 16-bit product/accumulation loses (at least) on test_half_precision's sizes:
#: each test asserts its sizes still separate the old behaviour from HALF_INPUT_FLOAT32_RTOL.
HALF_16BIT_ACCUMULATION_LOSS = 1e-2
