# Parallel GPT Lab: `make run` starts the app (and its runner), `make test` runs the whole suite.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 8501

.PHONY: run test test-fast lint bench clean-venv postgres-server slurm-tools slurm-dev slurm-dev-stop

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

# Debian's Slurm (22.05) and munge: the Slurm tests start a real two-node cluster on this machine (tests/slurm_cluster.py).
slurm-tools:
	@missing=; for cmd in slurmctld slurmd sbatch munged; do PATH="$$PATH:/usr/sbin:/sbin" command -v $$cmd >/dev/null 2>&1 || missing=1; done; \
	if [ -n "$$missing" ]; then DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge; fi

test: $(VENV)/.installed-dev /usr/bin/chromium postgres-server slurm-tools
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist worksteal --durations=20

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

# A local two-node Slurm cluster (nodes n1, n2; partition lab) under LAB_HOME/slurm-dev, for trying the Slurm
# backend: prints the `export SLURM_CONF=...` line to use it. Running it again finds it running; stop it with slurm-dev-stop.
slurm-dev: $(VENV)/.installed-run slurm-tools
	$(BIN)/python -m scripts.slurm_dev start

slurm-dev-stop: $(VENV)/.installed-run
	$(BIN)/python -m scripts.slurm_dev stop

clean-venv:
	rm -rf $(VENV)
