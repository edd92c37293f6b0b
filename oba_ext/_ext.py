"""Loading of the compiled extension ``oba_ext._C``, lazily and safely.

``import oba_ext`` never loads ``_C`` and never touches CUDA. The first use of one of the names
below imports ``oba_ext._C`` (which registers ``torch.ops.oba_ext.*``); if that fails (not built,
built against another torch, missing CUDA libraries), the failure is kept in ``load_error`` and
the kernels are reported unavailable instead of raising.

- ``HAS_CPU_KERNELS``: the CPU kernels are registered (module attribute, computed on first use).
- ``load_error``: the exception that prevented loading, or ``None``.
- ``load() -> bool``: try to load; True when loaded.
- ``has_cuda_kernels() -> bool``: CUDA kernels are registered (compiled in); says nothing about
  whether a GPU is visible, and does not initialise CUDA.
- ``kernels_available(device) -> bool``: kernels exist for ``device`` ("cpu", "cuda", "cuda:1",
  a ``torch.device``) and, for CUDA, a GPU is visible.
"""
from __future__ import annotations

import importlib
import threading
from typing import Optional, Union

import torch

__all__ = ["HAS_CPU_KERNELS", "load_error", "load", "has_cpu_kernels", "has_cuda_kernels",
           "kernels_available", "require", "build_info", "registered_ops"]

_lock = threading.Lock()
_state = {"tried": False, "module": None, "error": None}
# The op whose kernels tell which backends were compiled.
_PROBE_OP = "oba_ext::channel_score_reduce"


def load() -> bool:
    """Import ``oba_ext._C`` once; True on success. Failures are stored, not raised."""
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            try:
                _state["module"] = importlib.import_module("oba_ext._C")
            except Exception as e:  # ImportError, OSError (undefined symbols), ...
                _state["error"] = e
        return _state["module"] is not None


def _has_kernel(key: str) -> bool:
    if not load():
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(_PROBE_OP, key))
    except RuntimeError:  # op not registered at all
        return False


def has_cpu_kernels() -> bool:
    """The compiled CPU kernels are loaded and registered."""
    return _has_kernel("CPU")


def has_cuda_kernels() -> bool:
    """The compiled CUDA kernels are loaded and registered (no GPU needed, CUDA not initialised)."""
    return _has_kernel("CUDA")


def kernels_available(device: Union[str, torch.device, None] = "cpu") -> bool:
    """Whether the compiled kernels can run on ``device`` (a GPU must be visible for CUDA)."""
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cpu":
        return has_cpu_kernels()
    if dev.type == "cuda":
        return has_cuda_kernels() and torch.cuda.is_available()
    return False


def require(op: str) -> None:
    """Raise a RuntimeError naming ``op`` when the extension is not loaded."""
    if not load():
        raise RuntimeError(
            f"oba_ext.ops.{op}: the compiled extension oba_ext._C is not available "
            f"({type(_state['error']).__name__}: {_state['error']}). Build it with `make build` "
            f"(or `pip install --no-build-isolation -e .`), or use the pure-PyTorch twin "
            f"oba_ext.reference.*.{op}")


def build_info() -> dict:
    """What setup.py compiled (oba_ext/_build_info.py), or {} when unknown."""
    try:
        from ._build_info import BUILD_INFO
    except Exception:
        return {}
    return dict(BUILD_INFO)


def registered_ops() -> list:
    """Names of the registered ``torch.ops.oba_ext`` ops (after loading the extension)."""
    load()
    try:
        names = torch._C._dispatch_get_all_op_names()
    except AttributeError:
        return []
    return sorted(n.split("::", 1)[1].split(".")[0] for n in names if n.startswith("oba_ext::"))


def __getattr__(name: str):
    # Lazy module attributes: computed on first access, not at import.
    if name == "HAS_CPU_KERNELS":
        return has_cpu_kernels()
    if name == "load_error":
        load()
        return _state["error"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
