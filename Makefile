# Set-up and the two jobs. `make bench` runs the benchmark suite on the present device (the
# full suite on a GPU, a quick suite of the CPU paths otherwise); `make test` runs the tests
# (on a CPU-only machine the Triton kernels run through Triton's interpreter).
#
# Both create .venv on first use. Where the Python given by PYTHON already has torch and
# triton (a GPU machine, possibly offline), the venv reuses them and nothing is downloaded;
# otherwise torch==2.13.0 (a CPU wheel) and triton are installed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: bench test lint clean

bench: $(STAMP)
	$(PY) -m benchmarks

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check vlmkernels tests benchmarks
	$(PY) -m ruff format --check vlmkernels tests benchmarks

$(STAMP): pyproject.toml setup.py Makefile
	@set -e; \
	if $(PYTHON) -c "import torch, triton" 2>/dev/null; then \
		echo "reusing torch and triton from $(PYTHON)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
		$(PY) -m pip install -q --upgrade "setuptools>=64" wheel; \
		$(PY) -m pip install -q "torch==2.13.0"; \
		$(PY) -m pip install -q "triton>=3.6,<3.10"; \
	fi; \
	$(PY) -m pip install -q -e . --no-deps --no-build-isolation; \
	$(PY) -c "import pytest, numpy" 2>/dev/null || $(PY) -m pip install -q pytest numpy; \
	$(PY) -m pip show -q open_clip_torch >/dev/null 2>&1 || \
		$(PY) -m pip install -q --no-deps open_clip_torch || \
		echo "open_clip_torch not installed: the open_clip parity tests will be skipped"; \
	$(PY) -c "import transformers" 2>/dev/null || $(PY) -m pip install -q transformers || \
		echo "transformers not installed: the model-patching tests will be skipped"; \
	$(PY) -c "import pynvml" 2>/dev/null || $(PY) -m pip install -q nvidia-ml-py || true; \
	$(PY) -c "import tqdm, matplotlib, pytest_benchmark" 2>/dev/null || \
		$(PY) -m pip install -q tqdm matplotlib pytest-benchmark || \
		echo "tqdm/matplotlib/pytest-benchmark not installed: no progress bar, no charts"; \
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info
