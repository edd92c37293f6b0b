"""The first-GPU check script and the honest CUDA label (issue 11, asks 6 and 7).

The script's full smoke run (every step on the CPU with tiny sizes) is run by `.ci/run` after the
test suite; here only what is cheap: its argument handling, and `oba_ext.info`'s CUDA status.
"""
import os
import subprocess

from oba_ext import info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def _run(*args):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=60)


def test_gpu_check_usage_errors_exit_2():
    r = _run()
    assert r.returncode == 2 and "usage: benchmarks/gpu_check.sh [--smoke] OUTDIR" in r.stderr
    r = _run("--fast", "/tmp/x")
    assert r.returncode == 2 and "unknown option --fast" in r.stderr
    r = _run("a", "b")
    assert r.returncode == 2 and "one OUTDIR expected" in r.stderr


def test_cuda_status_is_honest_until_validated(monkeypatch):
    assert info.cuda_status(False) == "not built"
    monkeypatch.setattr(info, "CUDA_VALIDATED_ON", None)
    assert "not yet run on a GPU" in info.cuda_status(True)
    monkeypatch.setattr(info, "CUDA_VALIDATED_ON", "NVIDIA H200, torch 2.11, abc123")
    assert info.cuda_status(True) == "compiled; validated on NVIDIA H200, torch 2.11, abc123"
    d = info.collect()
    assert d["cuda_status"] == info.cuda_status(d["cuda_kernels"])
