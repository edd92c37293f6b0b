"""``python -m oba_ext.info``: what was built and what this machine can run.

Prints the torch / CUDA versions, whether the CPU and CUDA kernels were compiled (and for which
archs), whether a GPU is visible, and the registered ``torch.ops.oba_ext`` ops.
"""
from __future__ import annotations

import sys

import torch

from . import _ext

#: Where the CUDA kernels were last validated on a real GPU (``benchmarks/gpu_check.sh`` results
#: committed under ``benchmarks/results/``), e.g. ``"NVIDIA H200, torch 2.11, <git sha>"``.
#: ``None`` until that happens: the kernels are compiled and linked in CI but have never run.
CUDA_VALIDATED_ON = None


def cuda_status(cuda_kernels: bool) -> str:
    """One honest line about the CUDA kernels: built or not, and whether they have ever run."""
    if not cuda_kernels:
        return "not built"
    if CUDA_VALIDATED_ON is None:
        return ("compiled, but not yet run on a GPU: no GPU results are committed "
                "(benchmarks/gpu_check.sh produces them)")
    return f"compiled; validated on {CUDA_VALIDATED_ON}"


def collect() -> dict:
    """The report as a dict (also used by tests)."""
    info = _ext.build_info()
    loaded = _ext.load()
    gpu = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "built_with_torch": info.get("torch"),
        "extension_loaded": loaded,
        "load_error": None if loaded else repr(_ext.load_error),
        "cpu_kernels": _ext.has_cpu_kernels(),
        "cuda_kernels": _ext.has_cuda_kernels(),
        "cuda_status": cuda_status(_ext.has_cuda_kernels()),
        "cuda_archs": info.get("cuda_archs"),
        "cuda_home": info.get("cuda_home"),
        "debug_build": info.get("debug"),
        "gpu_visible": gpu,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if gpu else [],
        "ops": _ext.registered_ops(),
    }


def main() -> int:
    for key, value in collect().items():
        if key == "ops":
            value = ", ".join(value) if value else "(none)"
        print(f"{key:>17}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
