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

bench: $(VENV)/.installed
	$(PY) tools/benchmark.py $(BENCH_ARGS)

faults: $(VENV)/.installed
	$(PY) -m pytest tests/test_faults.py -m faults $(FAULT_ARGS)
