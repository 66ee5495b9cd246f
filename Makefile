# The two commands of the README: `make run` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
# the requirements files, exported from uv.lock (`make lock`); each installs with its hashes
EXPORT := $(PY) -m uv export --frozen --no-emit-project --format requirements-txt --no-default-groups

.PHONY: run test lint lock bench faults

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# `make run` needs the service and its demo neighbours; `make test` adds the test tools
$(VENV)/.installed-demo: requirements.txt requirements-demo.txt | $(VENV)/bin/python
	$(PY) -m pip install --quiet --require-hashes -r requirements-demo.txt
	touch $@

$(VENV)/.installed-dev: requirements.txt requirements-demo.txt requirements-dev.txt | $(VENV)/bin/python
	$(PY) -m pip install --quiet --require-hashes -r requirements-dev.txt
	touch $@ $(VENV)/.installed-demo

# the lab's tools are modules of the lab package, run from the repository root
run: $(VENV)/.installed-demo
	$(PY) -m lab.demo

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check .

test: lint
	bash tools/test_setup.sh
	$(PY) -m pytest $(PYTEST_ARGS)

# After a change of pyproject.toml: lock again and export the three requirements files.
lock: $(VENV)/.installed-dev
	$(PY) -m uv lock
	$(EXPORT) -o requirements.txt
	$(EXPORT) --group demo -o requirements-demo.txt
	$(EXPORT) --group demo --group dev -o requirements-dev.txt

# Not part of the tests: the benchmark and the long fault run (both restart nothing of yours
# but the fault run restarts this machine's RabbitMQ, Redis and PostgreSQL).
bench: $(VENV)/.installed-dev
	$(PY) -m lab.benchmark $(or $(BENCH_ARGS),--sagas 2000 --concurrency 16)

faults: $(VENV)/.installed-dev
	$(PY) -m lab.fault_run $(or $(FAULT_ARGS),--sagas 2000 --faults 20 --consumers 2 --seed 7)
