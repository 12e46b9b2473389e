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

# The TPU compiler (libtpu, a ~210 MB wheel; the version jax[tpu] pins) for `python -m nanogpt_jax.aot` and its
# tests: it compiles for TPU slices on this machine. It stays outside the venv's packages: where libtpu is
# importable and no TPU is attached, JAX tries the TPU first and libtpu prints warnings at every start (make
# demo, run_*.py). TPU_LIBRARY_PATH shows it to JAX for the tests only; JAX still runs on the CPU there.
LIBTPU_DIR := $(abspath $(VENV))/libtpu
TPU_STAMP := $(VENV)/.installed-libtpu
$(TPU_STAMP): $(STAMP)
	$(PIP) install -q --no-deps --upgrade --target $(LIBTPU_DIR) "$$($(PY) -c "import importlib.metadata as m; \
	  print(next(r.split(';')[0].replace(' ', '') for r in m.requires('jax') if r.startswith('libtpu')))")"
	@touch $@

test: $(STAMP) $(TPU_STAMP)
	TPU_LIBRARY_PATH=$(LIBTPU_DIR)/libtpu/libtpu.so $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check nanogpt_jax configs data_prep tests run_*.py

# Offline machines: point NANOGPT_DATA_MIRROR at local copies of the downloads and
# TIKTOKEN_CACHE_DIR at tiktoken's files (README, "Offline use"); ../shared/data is used when present.
SHARED_DATA := $(abspath $(wildcard ../shared/data))
ifneq ($(SHARED_DATA),)
export NANOGPT_DATA_MIRROR ?= $(SHARED_DATA)
export TIKTOKEN_CACHE_DIR ?= $(SHARED_DATA)/tiktoken_cache
endif

# make demo: TinyShakespeare (characters), nanoGPT's CPU recipe for 2000 steps, then 500 sampled
# characters; metrics, checkpoints and loss.png land in $(DEMO_OUT). Run again, it continues the run in
# $(DEMO_OUT) (init_from=resume): a finished run has nothing left to train, says where its figures are
# and samples again; an interrupted one trains on from its last checkpoint. A new run needs a new
# DEMO_OUT (make demo DEMO_OUT=out-demo-2). DEMO_* and DEMO_DEPS are for tests (tests/test_run_folder.py).
DEMO_OUT ?= out-shakespeare-char-cpu
DEMO_CONFIG ?= configs/shakespeare_char.py:cpu
DEMO_DATA ?= data/shakespeare_char
DEMO_ARGS ?=
DEMO_DEPS ?= $(STAMP)
# resume when the demo folder holds a checkpoint (a step folder under checkpoints/)
DEMO_INIT = $(if $(wildcard $(DEMO_OUT)/checkpoints/[0-9]*),resume,scratch)

demo: $(DEMO_DEPS)
	$(PY) data_prep/shakespeare_char.py --out_dir $(DEMO_DATA)
	$(PY) run_train.py --config $(DEMO_CONFIG) --config.data.data_dir=$(DEMO_DATA) --config.out_dir=$(DEMO_OUT) \
		--config.init_from=$(DEMO_INIT) $(DEMO_ARGS)
	$(PY) run_sample.py --config $(DEMO_CONFIG) --config.data.data_dir=$(DEMO_DATA) --config.out_dir=$(DEMO_OUT) \
		--config.init_from=resume --config.sample.prompt="ROMEO:" --config.sample.max_new_tokens=500 $(DEMO_ARGS)
	@echo "loss curve: $(DEMO_OUT)/loss.png, figures: $(DEMO_OUT)/summary.json"

clean:
	rm -rf $(VENV) build *.egg-info
