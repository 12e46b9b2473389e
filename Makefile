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

demo: $(STAMP)
	$(PY) -c "import torch; from nanogpt import GPT, GPTConfig; \
	m = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32)); \
	print(m.generate(torch.zeros(1, 1, dtype=torch.long), 16, temperature=0).tolist())"

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
