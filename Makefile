# The two commands a fresh machine needs: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.seglstm-installed
QUICK ?=

CONSTRAINTS := constraints.txt

.PHONY: setup test test-slow test-all demo lint clean constraints

# Every extra, at the exact versions of constraints.txt, so both commands are reproducible and the suite
# covers the optional features too.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[dev,all]'
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

# Re-lock constraints.txt: the newest releases within pyproject.toml's ranges, resolved in a fresh venv (the
# header comment is kept); then run `make test` against it and commit both.
constraints:
	rm -rf $(VENV)-lock && python3 -m venv $(VENV)-lock
	$(VENV)-lock/bin/python -m pip install -q '.[dev,all]'
	{ grep '^#' $(CONSTRAINTS); $(VENV)-lock/bin/python -m pip freeze --all --exclude seglstm --exclude pip \
	  | sort -f; } > $(CONSTRAINTS).tmp && mv $(CONSTRAINTS).tmp $(CONSTRAINTS)
	rm -rf $(VENV)-lock

clean:
	rm -rf runs build *.egg-info src/*.egg-info $(VENV)-lock
