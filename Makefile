# The two commands of the README: `make run` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test bench faults

$(VENV)/.installed: requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

run: $(VENV)/.installed
	$(PY) tools/demo.py

test: $(VENV)/.installed
	bash tools/test_setup.sh
	$(PY) -m pytest $(PYTEST_ARGS)

# Not part of the tests: the benchmark and the long fault run (both restart nothing of yours
# but the fault run restarts this machine's RabbitMQ, Redis and PostgreSQL).
bench: $(VENV)/.installed
	$(PY) tools/benchmark.py $(or $(BENCH_ARGS),--sagas 2000 --concurrency 16)

faults: $(VENV)/.installed
	$(PY) tools/fault_run.py $(or $(FAULT_ARGS),--sagas 2000 --faults 20 --consumers 2 --seed 7)
