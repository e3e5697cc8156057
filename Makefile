# Two entry points for a new user (see README):
#   make run   set up .venv and run the whole pipeline (prepare -> train -> evaluate) on the default
#   make test  set up .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch, installed before the project so pip does not pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup run test lint bench clean

setup: $(STAMP)

# pip at -qq reports errors only: a machine's pip configuration (an extra index that is not there) otherwise fills
# the install with warnings that are not the project's. setuptools builds the project without warnings
# (pyproject.toml: an SPDX license, every shipped directory listed).
PIP := $(BIN)/python -m pip install -qq

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing pip, torch ($(TORCH_SPEC), CPU build) and the pipeline with its dependencies into $(VENV) ..."
	$(PIP) --upgrade pip
	$(PIP) "$(TORCH_SPEC)"
	$(PIP) -e ".[dev]"
	# Chromium for the browser test (tests/browser.py), from Debian where we may install packages.
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get install -y -qq --no-install-recommends chromium >/dev/null || \
	   (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null)); } || \
	  echo "note: no chromium; the browser test needs it (apt-get install chromium)"
	touch $(STAMP)

run: setup
	$(BIN)/pipeline run $(ARGS)

# Two test processes, a file each at a time (a module's fixtures, such as the two-node Ray cluster, start once):
# the suite's tests mostly wait on subprocesses, so two share 2 cores well (31-32 min instead of 38-44 here).
# PYTEST_WORKERS=0 runs it in one process.
# --durations=30 lists the slowest tests at the end (where the suite's time goes).
PYTEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=30 tests $(ARGS)

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python -m benchmarks.run_all $(ARGS)

clean:
	rm -rf outputs
