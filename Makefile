# Two commands set everything up on a fresh machine:
#   make demo   — creates .venv, installs pinned dependencies, runs examples/quickstart.py
#   make test   — same environment, runs the default test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.attncomp-installed

.PHONY: demo test test-slow lint bench

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/quickstart.py

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

test-slow: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check attncomp passes tests examples benchmarks

bench: $(STAMP)
	$(PY) benchmarks/cpu_suite.py
