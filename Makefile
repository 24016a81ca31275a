# `make test` and `make demo` each create or refresh .venv on their own, so either works on a fresh machine.
# TORCH_INDEX_URL: an extra package index for the torch install alone. Plain PyPI's torch for Linux is the CUDA
# build (several GB with its nvidia-* packages); a CPU-only machine takes PyTorch's CPU wheels with
#   make test TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
PY ?= python3
TORCH_INDEX_URL ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned, from PyPI (and TORCH_INDEX_URL when set: its 2.13.0+cpu outranks PyPI's 2.13.0)
	$(BIN)/python -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL))
	$(BIN)/python -m pip install -q -e '.[test,plot]' ruff
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/specdec demo

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
