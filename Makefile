# `make demo`, `make test`, `make tour`, `make bench`, `make lint`, `make clean`.
# The first target run creates $(VENV) and installs the package with its dev extras;
# the stamp file makes later runs skip the install until pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv

VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test tour bench lint clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) -m mmlongnet.demo

tour: $(STAMP)
	$(VPY) -m mmlongnet.tour

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VPY) -m pytest -n 2 tests

bench: $(STAMP)
	$(VPY) benchmarks/attention.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
