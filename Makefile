# The two commands of the README: `make test` and `make demo`. Both set up .venv first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
SHARED  := $(abspath ../shared/data)
# Tests and the demo read local copies of external files from here when it exists.
export GPT2REPRO_ASSETS ?= $(if $(wildcard $(SHARED)),$(SHARED),)

.PHONY: venv test test-fast lint demo chat-demo bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch first, pinned: the CPU wheel on this machine's disk; the range in pyproject then installs nothing more.
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e '.[dev,hf,data,plot,eval,serve]'
	touch $@

# Two passes: two pytest workers (one per core, pytest-xdist) for all but the `serial` tests, then those
# alone (the server's timing bounds), collected from the files that mark some (collecting every file
# imports torch, inductor, transformers...: ~10 s, ~3 s more than these files). Each pass must pass.
PYTEST  := $(BIN)/python -m pytest -q
SERIAL  := $(shell grep -l 'mark\.serial' tests/test_*.py)
test: venv
	$(PYTEST) -n 2 --dist worksteal -m "not serial"
	$(PYTEST) -m serial $(SERIAL)

# the developers' quick loop: everything but the multi-process, subprocess-heavy and long tests
test-fast: venv
	$(PYTEST) -n 2 --dist worksteal -m "not slow and not serial"
	$(PYTEST) -m "serial and not slow" $(SERIAL)

lint: venv
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

demo: venv
	$(BIN)/python scripts/demo.py

# fine-tunes the demo model (trained first when runs/demo is absent) into a small chat model
chat-demo: venv
	$(BIN)/python scripts/chat_demo.py

bench: venv
	bash benchmarks/run_all.sh

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
