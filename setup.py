"""Build of the oba_ext C++/CUDA extension ``oba_ext._C``.

- CPU kernels (csrc/registration.cpp + csrc/cpu/*.cpp) are always built.
- CUDA kernels (csrc/cuda/*.cu, define ``OBA_WITH_CUDA``) are built whenever a CUDA toolkit is
  found and torch has CUDA, or when ``OBA_FORCE_CUDA=1``; ``OBA_NO_CUDA=1`` forces a CPU-only build.
- ``OBA_SKIP_EXT=1`` registers the Python package only (the Makefile uses it for the editable
  install, then compiles once in place with ``make build``).
- ``TORCH_CUDA_ARCH_LIST`` (default "8.0;8.6;8.9;9.0+PTX"), ``MAX_JOBS`` (default 2) and
  ``DEBUG=1`` (-g -O0) are honoured.

What was built is written to ``oba_ext/_build_info.py`` (read by ``python -m oba_ext.info``).

Install: ``pip install --no-build-isolation -e .`` (torch must already be installed).
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _is_cuda_root(path: str) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and any(
        os.path.exists(os.path.join(path, lib, "libcudart.so")) for lib in ("lib64", "lib"))


def _root_from_nvcc(nvcc: str):
    """The toolkit root behind an ``nvcc`` on PATH, which may be a wrapper script.

    torch guesses ``dirname(dirname(which nvcc))``; for a wrapper such as
    /usr/local/bin/nvcc (exec /usr/local/cuda-13.0/bin/nvcc "$@") that is /usr/local and the
    link fails with "cannot find -lcudart". We follow symlinks, then ask nvcc itself
    (``--dryrun`` prints ``TOP=<root>/bin/..``), then read the wrapper's text.
    """
    real = os.path.realpath(nvcc)
    cand = os.path.dirname(os.path.dirname(real))
    if _is_cuda_root(cand):
        return cand
    try:
        with tempfile.TemporaryDirectory() as tmp:
            probe = os.path.join(tmp, "probe.cu")
            with open(probe, "w") as f:
                f.write("int main() { return 0; }\n")
            out = subprocess.run([nvcc, "--dryrun", "-c", probe, "-o", probe + ".o"],
                                 capture_output=True, text=True, timeout=60)
        m = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
        if m:
            cand = os.path.normpath(m.group(1).strip('"').rstrip("/").removesuffix("/bin/.."))
            if _is_cuda_root(cand):
                return cand
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        if os.path.getsize(real) < 65536:
            with open(real, errors="ignore") as f:
                for m in re.finditer(r"(/[^\s\"']+)/bin/nvcc", f.read()):
                    if _is_cuda_root(m.group(1)):
                        return m.group(1)
    except OSError:
        pass
    return None


def find_cuda_home():
    """CUDA_HOME / CUDA_PATH when set; else the real root behind nvcc; else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        val = os.environ.get(var)
        if val and os.path.isdir(val):
            return val
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = _root_from_nvcc(nvcc)
        if root:
            return root
    return "/usr/local/cuda" if _is_cuda_root("/usr/local/cuda") else None


def main():
    """Configure the extension from the environment and run setuptools."""
    SKIP_EXT = _flag("OBA_SKIP_EXT")
    NO_CUDA = _flag("OBA_NO_CUDA")
    FORCE_CUDA = _flag("OBA_FORCE_CUDA")
    DEBUG = _flag("DEBUG")

    CUDA_HOME = None if (NO_CUDA or SKIP_EXT) else find_cuda_home()
    if CUDA_HOME:
        # torch.utils.cpp_extension reads CUDA_HOME at import time: set it first.
        os.environ["CUDA_HOME"] = CUDA_HOME
    os.environ.setdefault("MAX_JOBS", "2")

    ext_modules, cmdclass = [], {}
    build_info = {"cpu": False, "cuda": False, "cuda_archs": None}

    if not SKIP_EXT:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

        with_cuda = bool(CUDA_HOME) and torch.version.cuda is not None and not NO_CUDA
        if FORCE_CUDA and not NO_CUDA:
            if torch.version.cuda is None:
                sys.exit("setup.py: OBA_FORCE_CUDA=1 but this torch (%s) has no CUDA support"
                         % torch.__version__)
            if not CUDA_HOME:
                sys.exit("setup.py: OBA_FORCE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME")
            with_cuda = True
        if CUDA_HOME and not with_cuda and not NO_CUDA:
            print(f"setup.py: CUDA toolkit at {CUDA_HOME} but torch {torch.__version__} has no CUDA: "
                  f"building CPU kernels only", file=sys.stderr)

        sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) +
                         glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
        opt = ["-g", "-O0"] if DEBUG else ["-O3"]
        # -g0: drop the -g that Python's own CFLAGS add (debug info doubles compile time here).
        cxx_flags = opt + ["-Wno-unused-parameter"] + ([] if DEBUG else ["-g0"])
        macros = []
        archs = None
        if with_cuda:
            archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
            sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
            macros.append(("OBA_WITH_CUDA", None))
            nvcc_flags = (["-g", "-G", "-O0"] if DEBUG else ["-O3", "-lineinfo"])
            ext = CUDAExtension("oba_ext._C", sources, define_macros=macros,
                                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags})
        else:
            ext = CppExtension("oba_ext._C", sources, define_macros=macros,
                               extra_compile_args={"cxx": cxx_flags})
        ext_modules = [ext]
        build_info = {"cpu": True, "cuda": with_cuda, "cuda_archs": archs,
                      "cuda_home": CUDA_HOME if with_cuda else None,
                      "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                      "debug": DEBUG, "python": sys.version.split()[0],
                      "cuda_disabled_by_env": NO_CUDA}

        class Build(BuildExtension):
            """BuildExtension (ninja) that also records what it built in oba_ext/_build_info.py."""

            def run(self):
                path = os.path.join(ROOT, "oba_ext", "_build_info.py")
                with open(path, "w") as f:
                    f.write('"""Generated by setup.py: what the compiled oba_ext._C contains."""\n')
                    f.write(f"BUILD_INFO = {build_info!r}\n")
                super().run()

        cmdclass = {"build_ext": Build.with_options(use_ninja=True)}

    setup(
        packages=find_packages(include=["oba_ext", "oba_ext.*"]),
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )


if __name__ == "__main__":
    main()
