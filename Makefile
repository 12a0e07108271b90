# `make demo` runs the main job, `make test` the test suite; each creates its own environment in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

.PHONY: install demo test test-fast lint bench bench-real-size
install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/qscope demo

# Every test, spread over the CPUs; a module's tests that share one server or build stay in one process.
test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n auto --dist loadgroup

# The fast loop: pure math, parsing, files and errors (tests/conftest.py lists the modules), in one process.
test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -m "not slow"

lint: $(BIN)/.installed
	$(BIN)/ruff check .

# Every benchmark but the real-size one, which needs minutes, ~8 GiB of RAM and 1 GiB of disk per backbone.
bench: $(BIN)/.installed
	for script in $(filter-out benchmarks/bench_real_size.py,$(wildcard benchmarks/bench_*.py)); do \
		$(BIN)/python $$script || exit 1; done

bench-real-size: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_real_size.py
