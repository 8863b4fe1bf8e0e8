# The two commands a fresh machine needs: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.seglstm-installed
QUICK ?=

.PHONY: setup test test-slow test-all demo lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The suite a developer runs (well under 20 minutes on a 2-core CPU, install included).
test: setup
	$(PY) -m pytest -m "not slow"

# Model-scale checks (full-size presets, elastic restarts, load runs); CI runs them after `make test`.
test-slow: setup
	$(PY) -m pytest -m slow

test-all: setup
	$(PY) -m pytest

demo: setup
	$(VENV)/bin/seglstm demo $(if $(QUICK),--quick,)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs build *.egg-info src/*.egg-info
