"""The kernel-vs-reference tolerance rule of SPEC §7, as one table.

Errors are relative Frobenius errors ``‖x − ref₆₄‖ / ‖ref₆₄‖`` against the float64 reference
computed from the *same* (already rounded) inputs, so input rounding is not counted.

- float64: the kernel must match the float64 reference to ``FLOAT64_RTOL`` (absolute rule).
- float32 / float16 / bfloat16: the kernel's error may be at most ``FACTOR`` × the error of
  the pure-PyTorch twin run in the same dtype, plus the dtype's ``floor`` (the floor only
  covers a twin that happens to be exact; it is a few ulps of float32, far below the
  dtype's own rounding for 16-bit types).
"""
from __future__ import annotations

import torch

FLOAT64_RTOL = 1e-10
FACTOR = 2.0

#: dtype -> floor on the relative error, added to FACTOR × (twin's error in that dtype)
FLOORS = {
    torch.float32: 1e-6,    # ~8 ulp of float32
    torch.float16: 1e-5,    # 1% of a float16 ulp: the twin's own error dominates
    torch.bfloat16: 1e-5,   # 0.1% of a bfloat16 ulp
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


def assert_matches(out: torch.Tensor, ref64: torch.Tensor, twin_same_dtype: torch.Tensor = None,
                   dtype: torch.dtype = torch.float64, what: str = "") -> None:
    """Assert the kernel result ``out`` obeys the rule for ``dtype`` (the inputs' dtype).

    ``ref64``: the float64 reference; ``twin_same_dtype``: the twin run in ``dtype`` (needed for
    every dtype but float64). Failures print the errors and max/mean differences.
    """
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values in the kernel result"
    err = rel_err(out, ref64)
    if dtype == torch.float64:
        bound = FLOAT64_RTOL
        twin_err = float("nan")
    else:
        assert twin_same_dtype is not None, f"{what}: the {dtype} rule needs the twin's result"
        twin_err = rel_err(twin_same_dtype, ref64)
        bound = FACTOR * twin_err + FLOORS[dtype]
    assert err <= bound, (
        f"{what} [{dtype}]: relative error {err:.3e} > bound {bound:.3e} "
        f"(twin's error in this dtype {twin_err:.3e}); kernel: {_diff_summary(out, ref64)}")


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
