"""The build: what was compiled, loading, `python -m oba_ext.info`, and CUDA-home discovery.

On a machine with a CUDA toolkit and a CUDA build of torch, a CPU-only extension is a failure
(set OBA_NO_CUDA=1 when a CPU-only build is intended).
"""
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: every op csrc/registration.cpp defines; each needs a CPU kernel (and a CUDA one in a CUDA build)
EXPECTED_OPS = {"channel_score_reduce", "channel_score_reduce_add_", "channel_first_order_reduce",
                "linear_weight_score", "conv_weight_score", "attention_two_stream_forward",
                "attention_second_order_backward"}
#: internal ops (test hooks: the CUDA arithmetic emulated on the CPU, kernel configurations)
INTERNAL_OPS = {"_emulate_channel_score_reduce_cuda", "_emulate_channel_first_order_reduce_cuda",
                "_attention_forward_config", "_attention_backward_config"}


def has_kernel(op, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"oba_ext::{op}", key)


def load_setup_module():
    spec = importlib.util.spec_from_file_location("oba_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # main() only runs under __main__
    return mod


def run_py(code, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=300)


def toolkit_expected(info):
    """CUDA kernels are required unless the build (or this run) asked for CPU only."""
    if os.environ.get("OBA_NO_CUDA", "") in ("1", "true", "yes") or info.get("cuda_disabled_by_env"):
        return False
    return torch.version.cuda is not None and load_setup_module().find_cuda_home() is not None


def test_cpu_kernels_loaded():
    from oba_ext import _ext
    assert _ext.load(), f"oba_ext._C failed to load: {_ext.load_error!r} (run `make build`)"
    assert _ext.load_error is None
    assert _ext.HAS_CPU_KERNELS
    assert _ext.kernels_available("cpu")
    assert EXPECTED_OPS <= set(_ext.registered_ops())
    missing = [op for op in sorted(EXPECTED_OPS) if not has_kernel(op, "CPU")]
    assert not missing, f"ops without a CPU kernel: {missing}"


def test_registration_defines_exactly_the_expected_ops():
    """The lists above are the registration file's, so a new op cannot go untested here."""
    import re
    with open(os.path.join(ROOT, "csrc", "registration.cpp")) as f:
        defined = set(re.findall(r'm\.def\("(\w+)\(', f.read()))
    assert defined == EXPECTED_OPS | INTERNAL_OPS, sorted(defined ^ (EXPECTED_OPS | INTERNAL_OPS))


def test_cuda_kernels_compiled_when_toolkit_present():
    from oba_ext import _ext
    info = _ext.build_info()
    assert info.get("cpu") is True, f"oba_ext/_build_info.py missing or wrong: {info}"
    if toolkit_expected(info):
        assert info.get("cuda") is True, f"a CUDA toolkit is present but the build was CPU-only: {info}"
        assert _ext.has_cuda_kernels(), "CUDA kernels are not registered for oba_ext ops"
        missing = [op for op in sorted(EXPECTED_OPS) if not has_kernel(op, "CUDA")]
        assert not missing, f"ops without a CUDA kernel in a CUDA build: {missing}"
        assert "9.0" in (info.get("cuda_archs") or ""), info
    assert info.get("torch") == torch.__version__, (
        f"extension built against torch {info.get('torch')}, running {torch.__version__}: rebuild")


def test_import_never_initialises_cuda():
    r = run_py("""
        import torch, oba_ext, oba_ext.ops, oba_ext.info
        from oba_ext import _ext
        _ext.load(); _ext.has_cuda_kernels(); _ext.registered_ops()
        assert not torch.cuda.is_initialized(), "CUDA initialised at import"
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_import_works_without_extension():
    """A missing/broken _C (e.g. built against another torch) must not break `import oba_ext`."""
    r = run_py("""
        import sys
        sys.modules["oba_ext._C"] = None          # makes `import oba_ext._C` raise ImportError
        import torch, oba_ext
        from oba_ext import _ext, ops
        assert _ext.HAS_CPU_KERNELS is False
        assert not _ext.has_cuda_kernels() and not _ext.kernels_available("cpu")
        assert isinstance(_ext.load_error, ImportError), _ext.load_error
        x = torch.ones(2, 3)
        try:
            ops.channel_score_reduce(x, x, x, x, 1)
        except RuntimeError as e:
            assert "oba_ext.ops.channel_score_reduce" in str(e) and "make build" in str(e), e
            print("raised")
    """)
    assert r.returncode == 0 and "raised" in r.stdout, r.stdout + r.stderr


def test_info_module_runs():
    r = subprocess.run([sys.executable, "-m", "oba_ext.info"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for key in ("torch", "cpu_kernels", "cuda_kernels", "cuda_archs", "gpu_visible", "ops"):
        assert key in r.stdout, r.stdout
    for op in EXPECTED_OPS:
        assert op in r.stdout, r.stdout
    assert "cpu_kernels: True" in r.stdout, r.stdout


def test_cuda_home_from_wrapper_script(tmp_path, monkeypatch):
    """A PATH `nvcc` that is a wrapper script must resolve to the real toolkit root."""
    mod = load_setup_module()
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    real = mod.find_cuda_home()
    if real is None:
        pytest.skip("no CUDA toolkit on this machine")
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    assert shutil.which("nvcc") == str(wrapper)
    root = mod.find_cuda_home()
    assert root is not None and os.path.exists(os.path.join(root, "bin", "nvcc"))
    assert os.path.realpath(root) == os.path.realpath(real)
    assert mod._root_from_nvcc(str(wrapper)) is not None
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))    # an explicit CUDA_HOME wins
    assert mod.find_cuda_home() == str(tmp_path)
