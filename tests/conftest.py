"""Shared test plumbing.

- ``@pytest.mark.cuda`` tests are skipped (at run time, not collection time) when no GPU is
  visible: nothing here touches CUDA while tests are collected.
- A test with a ``device`` argument that does not parametrize it itself runs on "cpu" and on
  "cuda" (the latter marked ``cuda``).
- ``kernels(device)`` fixture: skips when the compiled kernels are not loaded for ``device``
  (``tests/test_build.py`` is the test that fails when the build is broken).
"""
import pytest

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (auto-skipped without one)")


def _parametrized_args(metafunc):
    names = set()
    for mark in metafunc.definition.iter_markers("parametrize"):
        argnames = mark.args[0] if mark.args else mark.kwargs.get("argnames", "")
        if isinstance(argnames, str):
            argnames = [n.strip() for n in argnames.split(",")]
        names.update(argnames)
    return names


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames and "device" not in _parametrized_args(metafunc):
        metafunc.parametrize("device", DEVICES)


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is not None:
        import torch
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")


@pytest.fixture
def kernels():
    """``kernels(device)``: skip unless the compiled oba_ext kernels can run on ``device``."""
    from oba_ext import _ext

    def need(device):
        if not _ext.load():
            pytest.skip(f"oba_ext._C is not loaded ({_ext.load_error!r}); see tests/test_build.py")
        if str(device).startswith("cuda") and not _ext.has_cuda_kernels():
            pytest.fail("a GPU is visible but oba_ext._C was built without CUDA kernels")
    return need


def pytest_collection_finish(session):
    """A test module that changes torch's default dtype at import would change every later test."""
    import torch
    if torch.get_default_dtype() != torch.float32:
        raise pytest.UsageError(f"a test module set torch's default dtype to "
                                f"{torch.get_default_dtype()} at import; use a fixture")


@pytest.fixture(autouse=True)
def _default_dtype_restored():
    """Each test leaves torch's default dtype as it found it."""
    import torch
    before = torch.get_default_dtype()
    yield
    after = torch.get_default_dtype()
    torch.set_default_dtype(before)
    assert after == before, f"the test changed torch's default dtype to {after} and left it"
