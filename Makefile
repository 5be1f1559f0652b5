# Two commands do all set-up on a fresh machine:
#   make demo   -> virtualenv + install, then `golfnb quickstart` (data, then the train/quantize/eval notebooks)
#   make test   -> virtualenv + install, then the test suite
# TORCH_SPEC selects the PyTorch build: plain `torch` by default (CUDA wheels on Linux); CI passes the CPU
# build with TORCH_SPEC="torch==2.13.0".
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -m "not slow" -q

.PHONY: setup demo test test-all clean-venv

$(VENV)/.golfnb-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[notebooks,dev]"
	touch $@

setup: $(VENV)/.golfnb-installed

demo: setup
	$(VENV)/bin/golfnb quickstart $(ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
