# afunix: `make demo` runs the tour, `make test` runs lint, types and tests (what
# .ci/run runs): with the compiled core built, the ASan check of it and the whole suite
# once per core, both at the same time; without it (no compiler), the suite on the pure
# core (docs/architecture.md, "The compiled core").
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CC     ?= cc
# The compiled core's source: a change rebuilds it (pip install -e runs build_ext).
CCORE  := src/afunix/_ccore.c
BUILD_INPUTS := pyproject.toml setup.py $(CCORE)
# Removed before each build, so that a failed build leaves no older core behind.
STALE_CORE := src/afunix/_ccore*.so
SAY_CORE := $(BIN)/python -c 'import afunix; print("afunix core:", afunix.__core__)'
# One run of the suite on one core: its own TMPDIR (pytest's temp dirs and every
# tempfile go there; 1777 like /tmp, for the peers run as nobody) and its own cache.
define run_suite
	@tmp=$$(mktemp -d /tmp/afx-$(1)-XXXXXX) && chmod 1777 $$tmp && \
	echo "pytest on the $(1) core (TMPDIR=$$tmp)" && \
	TMPDIR=$$tmp AFUNIX_EXPECT_CORE=$(1) $(2) $(BIN)/pytest -o cache_dir=.pytest_cache/$(1) \
	  $(PYTEST_ARGS); rc=$$?; rm -rf $$tmp; exit $$rc
endef
ASAN_DIR := build/asan
ASAN_TESTS = $(wildcard tests/unit/test_ccore*.py) tests/unit/test_property_channel.py \
             tests/integration/test_core_paths.py \
             tests/unit/test_core_choice.py

.PHONY: demo test lint types pytest pytest-compiled pytest-pure pytest-both asan ci clean venv-dev

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BUILD_INPUTS) | $(BIN)/python
	rm -f $(STALE_CORE)
	$(BIN)/python -m pip install -q -e '.[cli]'
	@$(SAY_CORE)
	touch $@

$(VENV)/.installed-dev: $(BUILD_INPUTS) | $(BIN)/python
	rm -f $(STALE_CORE)
	$(BIN)/python -m pip install -q -e '.[dev]'
	@$(SAY_CORE)
	touch $(VENV)/.installed $@

demo: $(VENV)/.installed
	$(BIN)/afunix tour

venv-dev: $(VENV)/.installed-dev

lint: venv-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

types: venv-dev
	$(BIN)/mypy

# The suite on whichever core this environment has (compiled where it was built).
pytest: venv-dev
	$(BIN)/pytest $(PYTEST_ARGS)

# The suite on one named core; tests/unit/test_core_choice.py fails the run if that
# core is not the one running (a missing extension fails, not passes on pure Python).
pytest-compiled: venv-dev
	$(call run_suite,compiled,)

pytest-pure: venv-dev
	$(call run_suite,pure-python,AFUNIX_PURE_PYTHON=1)

# Both at the same time, one per CPU; each run's output is printed when it ends.
pytest-both: venv-dev
	$(MAKE) --no-print-directory -j2 --output-sync=target pytest-compiled pytest-pure

# The compiled core built with AddressSanitizer into $(ASAN_DIR) (a copy of the package
# beside it, ahead of the editable install on PYTHONPATH), and its fuzz and differential
# tests run against it. detect_leaks=0: CPython itself does not free everything at exit.
# PYTHONMALLOC=malloc: every object through malloc, so ASan sees overflows between them.
# Reports go to files (log_path), which the target prints: ASan ends the process with
# _exit, and a report written to the stderr pytest captures would be lost with it.
asan: venv-dev
	rm -rf $(ASAN_DIR) && mkdir -p $(ASAN_DIR)
	cp -r src/afunix $(ASAN_DIR)/afunix && rm -f $(ASAN_DIR)/afunix/_ccore*.so
	$(CC) -shared -fPIC -O1 -g -fsanitize=address -fno-omit-frame-pointer \
	  -Wall -Wextra -Werror -DPy_LIMITED_API=0x030B0000 \
	  -I"$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("include"))')" \
	  $(CCORE) -o $(ASAN_DIR)/afunix/_ccore.abi3.so
	LD_PRELOAD="$$($(CC) -print-file-name=libasan.so)" \
	  ASAN_OPTIONS=detect_leaks=0:log_path=$(abspath $(ASAN_DIR))/report \
	  PYTHONMALLOC=malloc PYTHONPATH=$(ASAN_DIR) AFUNIX_EXPECT_CORE=compiled \
	  AFUNIX_EXPECT_CCORE=$(ASAN_DIR)/afunix \
	  $(BIN)/pytest -p no:cacheprovider -q $(ASAN_TESTS); rc=$$?; \
	for r in $(ASAN_DIR)/report.*; do [ -e "$$r" ] && cat "$$r" && rc=1; done; \
	[ $$rc = 0 ] || echo "make asan: failed (AddressSanitizer reports above, if any)"; exit $$rc

# Every core this checkout has. Under CI (CI=true), where .ci/run installed a compiler
# and the Python headers, a compiled core that did not build fails the run.
test: lint types
	@if $(BIN)/python -c 'import sys, afunix._core as c; sys.exit(c.ccore is None)'; then \
	  $(MAKE) --no-print-directory asan pytest-both; \
	elif [ "$$CI" = true ]; then \
	  echo "make test: CI=true, but the compiled core does not run: $$($(BIN)/python -c \
	    'import afunix._core as c; print(c.WHY)')" >&2; \
	  exit 1; \
	else \
	  echo "make test: no compiled core in this checkout: the suite on the pure core"; \
	  $(MAKE) --no-print-directory pytest-pure; \
	fi

ci: test

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache $(STALE_CORE)
