# Set-up and the two jobs. `make bench` runs the benchmark suite on the present device (the
# full suite on a GPU, a quick suite of the CPU paths otherwise); `make test` runs the tests
# (on a CPU-only machine the Triton kernels run through Triton's interpreter).
#
# Both create .venv on first use. Where the Python given by PYTHON already has torch and
# triton outside a virtual environment (a GPU machine, possibly offline), the venv reuses
# them (--system-site-packages) and nothing is downloaded; a venv's Python cannot lend its
# packages that way. Otherwise (a bare machine, or PYTHON inside a venv) torch==2.13.0 (a CPU
# wheel) and triton are installed.
#
# `make test` runs the tests twice for transformers: the whole suite with the newest release
# (what `pip install transformers` gives users today), then the patching tests (every
# family's tables) and the get_rope_index tests again with the oldest supported releases,
# each installed with `pip --target` into .venv/transformers-<version> and put first on
# PYTHONPATH. The second runs check what depends on the transformers release (which table
# matches, the forwards the tables replace, the signatures they are called with) and run
# the ops on their PyTorch backend (VLMKERNELS_BACKEND=torch): the Triton kernels do not
# depend on it and the first run interprets them, on the same models (a third of the time).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip install -q --disable-pip-version-check
# The oldest transformers of each rotary layout: 5.16 (apply_multimodal_rotary_pos_emb) and
# 5.17 (the GPU machine's; merged tables).
OLD_TRANSFORMERS ?= 5.16.1 5.17.0
OLD_TF_DIRS := $(foreach v,$(OLD_TRANSFORMERS),$(VENV)/transformers-$(v)/.installed)
TRANSFORMERS_TESTS := tests/test_patch_transformers.py tests/test_rope_index.py \
	tests/test_attention_patch.py tests/test_connectors_patch.py tests/test_qformer.py
# pytest-xdist workers: the tests are mostly single-threaded Python (Triton's interpreter),
# so the 2-core CI machine runs two at once (one process where xdist is not installed).
PYTEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -p no:cacheprovider \
	$$($(PY) -c "import xdist" 2>/dev/null && echo "-n $(PYTEST_WORKERS)")

.PHONY: bench test test-old-transformers lint clean

bench: $(STAMP)
	$(PY) -m benchmarks

test: $(STAMP)
	$(PYTEST) tests
	$(MAKE) --no-print-directory test-old-transformers

test-old-transformers: $(OLD_TF_DIRS)
	@set -e; for v in $(OLD_TRANSFORMERS); do \
		dir=$(VENV)/transformers-$$v; \
		if [ -f $$dir/.unavailable ]; then echo "transformers $$v: not installable here, skipped"; continue; fi; \
		echo "== the transformers tests again with transformers $$v (PyTorch backend)"; \
		PYTHONPATH=$$dir VLMKERNELS_BACKEND=torch $(PYTEST) $(TRANSFORMERS_TESTS); \
	done

# transformers <version> and what it needs that the venv lacks (huggingface-hub 1.x, httpx),
# without a second numpy or typing_extensions shadowing the venv's. Offline (the GPU
# machine) the directory is marked unavailable and the second run is skipped.
$(VENV)/transformers-%/.installed: | $(STAMP)
	@set -e; dir=$(VENV)/transformers-$*; rm -rf $$dir; \
	if $(PIP) --target $$dir "transformers==$*" >$(VENV)/transformers-$*.log 2>&1; then \
		rm -rf $$dir/numpy $$dir/numpy.libs $$dir/numpy-*.dist-info \
			$$dir/typing_extensions.py $$dir/typing_extensions-*.dist-info $$dir/bin; \
	else \
		mkdir -p $$dir; touch $$dir/.unavailable; \
		echo "transformers $* could not be installed (see $(VENV)/transformers-$*.log)"; \
	fi; \
	touch $$dir/.installed

lint: $(STAMP)
	$(PIP) ruff
	$(PY) -m ruff check vlmkernels tests benchmarks
	$(PY) -m ruff format --check vlmkernels tests benchmarks

# open_clip_torch is not installed (its dependencies pull torchvision and a CUDA torch): the
# tests compare against its loss.py, which imports only torch, extracted from the wheel into
# $(VENV)/open_clip/loss.py.
$(STAMP): pyproject.toml setup.py Makefile
	@set -e; \
	if $(PYTHON) -c "import sys, torch, triton; sys.exit(sys.prefix != sys.base_prefix)" \
			2>/dev/null; then \
		echo "reusing torch and triton from $(PYTHON)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
		$(PIP) --upgrade "setuptools>=64" wheel; \
		$(PIP) "torch==2.13.0"; \
		$(PIP) "triton>=3.6,<3.10"; \
	fi; \
	$(PIP) -e . --no-deps --no-build-isolation; \
	$(PY) -c "import pytest, numpy" 2>/dev/null || $(PIP) pytest numpy; \
	$(PY) -c "import xdist" 2>/dev/null || $(PIP) pytest-xdist || \
		echo "pytest-xdist not installed: the tests run in one process"; \
	$(PY) -c "import transformers" 2>/dev/null || $(PIP) transformers || \
		echo "transformers not installed: the model-patching tests will be skipped"; \
	$(PY) -c "import pynvml" 2>/dev/null || $(PIP) nvidia-ml-py || true; \
	$(PY) -c "import tqdm, matplotlib, pytest_benchmark" 2>/dev/null || \
		$(PIP) tqdm matplotlib pytest-benchmark || \
		echo "tqdm/matplotlib/pytest-benchmark not installed: no progress bar, no charts"; \
	$(PY) scripts/open_clip_loss.py $(VENV)/open_clip || \
		echo "open_clip's loss.py not found: the open_clip parity tests will be skipped"; \
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info
