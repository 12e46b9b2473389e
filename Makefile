# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
# torch is installed first at a pinned version and held by a constraints file, so installing the
# package can never make the resolver fetch another torch (e.g. gigabytes of CUDA wheels).
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-dev

.PHONY: demo test install lint clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	echo "torch==$(TORCH_VERSION)" > $(VENV)/constraints.txt
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -c $(VENV)/constraints.txt -e ".[dev]"
	$(PY) -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('$(TORCH_VERSION)') else 'torch ' + v + ' installed, expected $(TORCH_VERSION)')"
	@touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

# Offline machines: point NANOGPT_DATA_MIRROR at local copies of the downloads (README, "Offline
# and air-gapped use"); a ../shared/data folder beside the checkout is used when present.
export NANOGPT_DATA_MIRROR ?= $(abspath $(wildcard ../shared/data))
DEMO_OUT ?= out-shakespeare-char-cpu

demo: $(STAMP)
	$(VENV)/bin/nanogpt-prepare data=shakespeare_char
	$(VENV)/bin/nanogpt-train --config-name=train_shakespeare_char_cpu out_dir=$(DEMO_OUT) "logger=[console,csv]"
	$(VENV)/bin/nanogpt-sample out_dir=$(DEMO_OUT) num_samples=1 max_new_tokens=500 start="ROMEO:"
	$(VENV)/bin/nanogpt-plot $(DEMO_OUT) -o $(DEMO_OUT)/loss.png

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
