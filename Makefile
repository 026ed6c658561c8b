# Two commands: `make train` (the default recipe) and `make test` (the whole suite).
# Each (re)creates .venv from requirements.txt when it is missing or older than that file.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: train test test-fast clean-venv

$(VENV)/.installed: requirements.txt
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

train: $(VENV)/.installed
	$(PY) train.py

test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=15 tests

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" tests

clean-venv:
	rm -rf $(VENV)
