# Everything runs as root on a Debian bookworm machine (the rehearsal hosts are namespaces).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
LOCK := requirements.lock
PY := $(VENV)/bin/python
N ?= 2
FLEET ?= rehearsal
export MLSTACK_FLEET := $(FLEET)

.PHONY: rehearse test lint test-unit test-fast test-heavy test-slow fleet-up fleet-down fleet-status bench bench-transfer bench-env bench-fanout bench-status bench-noop prereqs venv lock

## The two set-up commands (README Quickstart)
rehearse: prereqs venv  ## converge a local rehearsal fleet twice; the second run must change nothing
	$(PY) -m rehearsal.rehearse

test: prereqs venv lint  ## lint, unit tests, then the fleet tier (heavy and slow tests excluded): under 15 minutes
	$(PY) -m pytest -m "not heavy and not slow" --durations=25

lint: prereqs venv  ## ruff and mypy over the Python, shellcheck over the shell programs
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	shellcheck files/*.sh files/host/*.sh tests/real_gpu/*.sh

test-unit: venv  ## unit tests only: no root, no fleet, seconds
	$(PY) -m pytest tests/unit

test-fast: venv  ## the edit-test loop: ruff, mypy, shellcheck (where installed) and the unit tests; no root, no docker engine
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	if command -v shellcheck >/dev/null; then shellcheck files/*.sh files/host/*.sh tests/real_gpu/*.sh; fi
	$(PY) -m pytest tests/unit -q

test-heavy: prereqs venv  ## the long fleet scenarios (faults, races, release histories, hostile hosts); CI runs them after make test
	$(PY) -m pytest -m "heavy and not slow" --durations=25

test-slow: prereqs venv  ## the opt-in CUDA production env (2.9 GB of wheels)
	$(PY) -m pytest -m slow

## The rehearsal fleet
fleet-up: prereqs venv  ## bring the fleet to N hosts (default 2): make fleet-up N=3
	$(PY) -m rehearsal up $(N)

fleet-down: venv  ## stop and remove every host of the fleet
	$(PY) -m rehearsal down

fleet-status: venv
	$(PY) -m rehearsal status

bench: prereqs venv  ## printed tables, not tests
	$(PY) -m bench.fleet

bench-transfer: prereqs venv  ## one 500 MB upload: the deploy's path against OpenSSH's cat
	$(PY) -m bench.transfer

bench-env: prereqs venv  ## the production env on 2 hosts: first install, upgrades, disk of 3 versions, throughput
	$(PY) -m bench.env_store

bench-fanout: prereqs venv  ## hosts feed hosts at 8 and 16 hosts: control egress and wall time, direct vs fan-out; the model at 100 and 1,000
	$(PY) -m bench.fanout

bench-status: prereqs venv  ## mlstack status against an empty pyinfra run on 8 hosts (make bench-status N=4: on 4)
	$(PY) -m bench.status $(if $(filter command line,$(origin N)),$(N),8)

bench-noop: prereqs venv  ## control-node CPU of a no-op deploy against an empty pyinfra deploy at 1, 8, 16 hosts (SIZES="1 8")
	$(PY) -m bench.noop $(SIZES)

## Set-up
prereqs:  ## apt packages and the compose v2 plugin (idempotent, asks no registry when all is there)
	$(PYTHON) -m rehearsal.prereqs

venv: $(VENV)/.installed

# Exactly the lock's versions, each file checked against its hashes; then the project itself, nothing more.
$(VENV)/.installed: $(LOCK) pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --require-hashes -r $(LOCK)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

# The lock is for Python 3.11 on Linux x86_64 (this machine and CI), resolved by uv from a throwaway venv.
# Pins still allowed by pyproject.toml stay; `make lock UPGRADE=1` takes the newest allowed versions instead.
lock:  ## refresh requirements.lock (dependencies and the dev extra, with hashes) after editing pyproject.toml
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && $(PYTHON) -m venv "$$tmp" && \
	"$$tmp/bin/pip" install --quiet --disable-pip-version-check uv && \
	"$$tmp/bin/uv" pip compile pyproject.toml --extra dev --generate-hashes --python-version 3.11 \
		--python-platform x86_64-unknown-linux-gnu $(if $(UPGRADE),--upgrade) \
		--custom-compile-command 'make lock' --quiet --output-file $(LOCK)
