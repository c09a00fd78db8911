# Two commands do all set-up on a fresh machine:
#   make demo   - create .venv, build the op library, convert the default model, print the parity report
#   make test   - the whole test suite (what .ci/run calls)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= llama-stdlib
OUT ?= out/$(MODEL)
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2

.PHONY: setup build demo test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q scikit-build-core ninja cmake pytest hypothesis
	$(BIN)/pip install -q --no-build-isolation -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# Rebuild the op library in place after editing custom_ops/ (the editable install reuses build/).
build: setup
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .

demo: setup
	$(BIN)/toolkit convert $(MODEL) -o $(OUT) --overwrite --sampling-head 50
	$(BIN)/toolkit generate $(OUT) --prompt "def parse_args(" --max-new-tokens 24

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf build out $(VENV)
