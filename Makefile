# Parallel GPT Lab: `make run` starts the app (and its runner), `make test` runs the whole suite.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 8501

.PHONY: run test test-fast lint bench clean-venv postgres-server

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Stamps: a second make reinstalls nothing unless a requirements file changed.
$(VENV)/.installed-run: requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $(VENV)/.installed-run $@

# Debian's Chromium for the browser tests (Playwright's own browser download does not work here).
/usr/bin/chromium:
	DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

run: $(VENV)/.installed-run
	$(BIN)/python -m streamlit run app.py --server.address 127.0.0.1 --server.port $(PORT)

# Debian's PostgreSQL server binaries: the storage and runner tests also run against a real server.
PG_INITDB := $(firstword $(wildcard /usr/lib/postgresql/*/bin/initdb))
postgres-server:
	@if [ -z "$(PG_INITDB)" ]; then DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; fi

test: $(VENV)/.installed-dev /usr/bin/chromium postgres-server
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist worksteal

test-fast: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -n 2 --dist worksteal -m "not slow"

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Every bench/bench_*.py script, one after another; nothing to do (and no error) while bench/ has none.
bench: $(VENV)/.installed-dev
	@set -e; found=0; for script in bench/bench_*.py; do [ -e "$$script" ] || continue; found=1; \
	  echo "== $$script"; $(BIN)/python "$$script"; done; \
	[ $$found = 1 ] || echo "no bench/bench_*.py scripts yet"

clean-venv:
	rm -rf $(VENV)
