# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
# torch (only a test oracle: transformers' GPT2LMHeadModel) is installed first at a pinned version
# and held by a constraints file, so installing the package never pulls gigabytes of CUDA wheels.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-dev

.PHONY: demo test install install-aot lint clean

$(STAMP): setup.cfg pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	echo "torch==$(TORCH_VERSION)" > $(VENV)/constraints.txt
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -c $(VENV)/constraints.txt -e ".[dev]"
	$(PY) -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('$(TORCH_VERSION)') else 'torch ' + v + ' installed, expected $(TORCH_VERSION)')"
	@touch $@

install: $(STAMP)

# The TPU and GPU compilers for `python -m nanogpt_jax.aot` and its tests: they compile for TPU slices and
# NVIDIA GPUs on this machine. Both stay outside the venv's packages: where libtpu or the CUDA plugin is
# importable and no accelerator is attached, JAX tries it first and prints warnings at every start (make
# demo, run_*.py). The aot tool finds them in .venv/libtpu and .venv/cuda_aot (or TPU_LIBRARY_PATH and
# NANOGPT_CUDA_AOT_PATH); every other run stays on the CPU, quietly.
# libtpu: a ~210 MB wheel, the version jax[tpu] pins.
LIBTPU_DIR := $(abspath $(VENV))/libtpu
TPU_STAMP := $(VENV)/.installed-libtpu
$(TPU_STAMP): $(STAMP)
	$(PIP) install -q --no-deps --upgrade --target $(LIBTPU_DIR) "$$($(PY) -c "import importlib.metadata as m; \
	  print(next(r.split(';')[0].replace(' ', '') for r in m.requires('jax') if r.startswith('libtpu')))")"
	@touch $@

# The gpu-aot extra (setup.cfg), the CUDA plugin pinned to jax's version: ~940 MB of wheels (cuDNN's is 716
# MB), cached by pip. Compiling needs only cuDNN's loader and graph library (jax reads cuDNN's version;
# no kernel runs without a GPU), so its kernel libraries (1 GB) are removed: 0.7 GB stay on disk.
CUDA_AOT_DIR := $(abspath $(VENV))/cuda_aot
CUDA_STAMP := $(VENV)/.installed-cuda-aot
$(CUDA_STAMP): $(STAMP)
	rm -rf $(CUDA_AOT_DIR)
	$(PIP) install -q --no-deps --target $(CUDA_AOT_DIR) $$($(PY) -c "import importlib.metadata as m; \
	  v = m.version('jax'); extra = [r.split(';')[0].replace(' ', '') for r in m.requires('nanogpt_jax') \
	  if 'gpu-aot' in r]; print(' '.join(r.split('>')[0] + '==' + v if r.startswith('jax-cuda') else r for r in extra))")
	rm -f $(CUDA_AOT_DIR)/nvidia/cudnn/lib/libcudnn_adv.so.* $(CUDA_AOT_DIR)/nvidia/cudnn/lib/libcudnn_cnn.so.* \
	  $(CUDA_AOT_DIR)/nvidia/cudnn/lib/libcudnn_engines_*.so.* $(CUDA_AOT_DIR)/nvidia/cudnn/lib/libcudnn_ext.so.* \
	  $(CUDA_AOT_DIR)/nvidia/cudnn/lib/libcudnn_heuristic.so.* $(CUDA_AOT_DIR)/nvidia/cudnn/lib/libcudnn_ops.so.*
	@touch $@

install-aot: $(TPU_STAMP) $(CUDA_STAMP)

test: $(STAMP) $(TPU_STAMP) $(CUDA_STAMP)
	TPU_LIBRARY_PATH=$(LIBTPU_DIR)/libtpu/libtpu.so NANOGPT_CUDA_AOT_PATH=$(CUDA_AOT_DIR) $(PY) -m pytest -q

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
