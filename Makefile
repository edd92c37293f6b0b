# oba_ext: `make test` and `make demo` work on a fresh clone (they create .venv and build first).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.oba_ext_stamp
export MAX_JOBS ?= 2

.PHONY: build test demo info bench clean

# Stamp file: re-running `make .venv` is a no-op once the environment is complete.
$(VENV): $(STAMP)
$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PIP) install torch torchvision
	$(PIP) install numpy ninja pybind11 pytest tqdm matplotlib scikit-learn torch-pruning scipy timm transformers \
		curvlinops-for-pytorch backpack-for-pytorch
	# Registers the package only; `make build` compiles the extension once, in place.
	OBA_SKIP_EXT=1 $(PIP) install --no-build-isolation --no-deps -e .
	touch $(STAMP)

# Incremental in-place build; the lock keeps two builds out of the same ninja build dir.
build: $(STAMP)
	flock /tmp/oba_ext_build.lock $(PY) setup.py build_ext --inplace

test: $(STAMP) build
	$(PY) -m pytest -q -rs -p no:cacheprovider --durations=15 tests

demo: $(STAMP) build
	$(PY) -m oba_ext.cli demo

info: $(STAMP) build
	$(PY) -m oba_ext.info

# Every benchmarks/bench_*.py; rows are appended to benchmarks/results/*.csv.
bench: $(STAMP) build
	for f in benchmarks/bench_*.py; do test -e "$$f" || continue; \
	  $(PY) -m benchmarks.$$(basename $$f .py) || exit 1; done

clean:
	rm -rf build oba_ext/_C*.so oba_ext/_build_info.py *.egg-info
