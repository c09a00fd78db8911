# Two commands do all set-up on a fresh machine:
#   make demo   - create .venv, build the op library, convert the default model, print the parity report
#   make test   - the whole test suite (what .ci/run calls)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= llama-stdlib
OUT ?= out/$(MODEL)
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2

.PHONY: setup build demo test test-sanitize clean

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

# The op tests against AddressSanitizer and UndefinedBehaviorSanitizer builds of the
# library (CPU kernels). Python is not instrumented, so the runtimes are preloaded;
# libstdc++ too, or ASan cannot intercept C++ throws. -s: a sanitizer report goes to
# stderr, which pytest would otherwise capture and lose when the process aborts.
test-sanitize: setup
	for san in address:asan undefined:ubsan; do \
	  kind=$${san%%:*}; lib=$${san##*:}; \
	  $(BIN)/cmake -S custom_ops -B build/ops-$$lib -G Ninja -DTOOLKIT_CUDA=OFF -DTOOLKIT_SANITIZE=$$kind \
	    -DCMAKE_BUILD_TYPE=RelWithDebInfo > /dev/null && $(BIN)/cmake --build build/ops-$$lib -j2 > /dev/null || exit 1; \
	  LD_PRELOAD="$$(gcc -print-file-name=lib$$lib.so) $$(gcc -print-file-name=libstdc++.so)" \
	  ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  TOOLKIT_OPS_LIBRARY=build/ops-$$lib/libtoolkit_ops.so \
	  $(BIN)/python -m pytest -q -s -p no:cacheprovider tests/ops tests/reliability/test_concurrency.py || exit 1; \
	done
