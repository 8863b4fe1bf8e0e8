# The two commands a fresh machine needs: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.seglstm-installed
QUICK ?=

.PHONY: setup test test-fast demo lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

demo: setup
	$(VENV)/bin/seglstm demo $(if $(QUICK),--quick,)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs build *.egg-info src/*.egg-info
