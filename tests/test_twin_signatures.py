"""Every compiled-op wrapper in ``oba_ext/ops`` and its pure-PyTorch twin in
``oba_ext/reference`` (same module name) have the same signature: parameter names, order,
defaults and annotations. The twins are drop-in replacements (the kernel registry picks one or
the other per device), so their signatures are written twice on purpose; this test is what
keeps the two copies one contract (issue 14: the only duplicated run left in ``oba_ext/``)."""
from __future__ import annotations

import importlib
import inspect

import pytest

#: ops modules with twins; "available" (whether the compiled ops are registered) has none
MODULES = ("attention", "channel", "weight")
NOT_TWINNED = {"available"}


@pytest.mark.parametrize("module", MODULES)
def test_ops_and_reference_twins_share_signatures(module):
    ops = importlib.import_module(f"oba_ext.ops.{module}")
    ref = importlib.import_module(f"oba_ext.reference.{module}")
    names = [n for n in ops.__all__ if n not in NOT_TWINNED]
    assert names, f"oba_ext.ops.{module} exports no ops"
    for name in names:
        assert hasattr(ref, name), f"oba_ext.reference.{module} has no twin of {name}"
        got, want = inspect.signature(getattr(ref, name)), inspect.signature(getattr(ops, name))
        assert got == want, f"{module}.{name}: reference {got} != ops {want}"
