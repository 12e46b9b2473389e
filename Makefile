# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
# torch (only a test oracle: transformers' GPT2LMHeadModel) is installed first at a pinned version
# and held by a constraints file, so installing the package never pulls gigabytes of CUDA wheels.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-dev

.PHONY: demo test install lint clean

$(STAMP): setup.cfg pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	echo "torch==$(TORCH_VERSION)" > $(VENV)/constraints.txt
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -c $(VENV)/constraints.txt -e ".[dev]"
	$(PY) -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('$(TORCH_VERSION)') else 'torch ' + v + ' installed, expected $(TORCH_VERSION)')"
	@touch $@

install: $(STAMP)

# The TPU compiler (libtpu, a ~210 MB wheel), for `python -m nanogpt_jax.aot` and its tests: it compiles for
# TPU slices on this machine. jax[tpu] at the installed jax's version brings the libtpu that jax pins; JAX
# still runs on the CPU (or GPU) here, as before.
TPU_STAMP := $(VENV)/.installed-libtpu
$(TPU_STAMP): $(STAMP)
	$(PIP) install -q -c $(VENV)/constraints.txt "jax[tpu]==$$($(PY) -c 'import jax; print(jax.__version__)')"
	@touch $@

test: $(STAMP) $(TPU_STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check nanogpt_jax configs data_prep tests run_*.py

# Offline machines: point NANOGPT_DATA_MIRROR at local copies of the downloads and
# TIKTOKEN_CACHE_DIR at tiktoken's files (README, "Offline use"); ../shared/data is used when present.
SHARED_DATA := $(abspath $(wildcard ../shared/data))
ifneq ($(SHARED_DATA),)
export NANOGPT_DATA_MIRROR ?= $(SHARED_DATA)
export TIKTOKEN_CACHE_DIR ?= $(SHARED_DATA)/tiktoken_cache
endif

clean:
	rm -rf $(VENV) build *.egg-info
