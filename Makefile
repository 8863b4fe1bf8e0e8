# The two commands a fresh machine needs: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.seglstm-installed
QUICK ?=

CONSTRAINTS := constraints.txt

.PHONY: setup test test-slow test-all test-lightning-latest demo lint clean constraints

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

# The Lightning-facing tests (training loop, callbacks, checkpoints, CLI, signals, DDP) against the newest
# Lightning on the package index, beside the locked one, so a release that breaks users' installs shows up
# in CI first. Everything else stays at constraints.txt (the dev and tensorboard extras: what these tests
# import); the venv is kept between runs (pip only upgrades). About 3 min on a 2-core CPU, install included.
LATEST_VENV := .venv-latest
LATEST_PKGS := lightning pytorch-lightning lightning-utilities torchmetrics
LATEST_RE := ^(lightning|pytorch-lightning|lightning-utilities|torchmetrics)==
LIGHTNING_TESTS := tests/test_lightning_compat.py tests/test_data_order.py tests/test_training_task.py \
	tests/test_training_checkpoints.py tests/test_training_ddp.py tests/test_cli_lightning.py \
	tests/test_reliability_cli.py tests/test_reliability_signals.py tests/test_reliability_resume.py \
	tests/test_reliability_lock.py
test-lightning-latest:
	test -x $(LATEST_VENV)/bin/python || python3 -m venv $(LATEST_VENV)
	grep -v -i -E '$(LATEST_RE)' $(CONSTRAINTS) > $(LATEST_VENV)/constraints-unlocked.txt
	$(LATEST_VENV)/bin/python -m pip install -q -c $(LATEST_VENV)/constraints-unlocked.txt -e '.[dev,tensorboard]'
	$(LATEST_VENV)/bin/python -m pip install -q -c $(LATEST_VENV)/constraints-unlocked.txt -U $(LATEST_PKGS)
	$(LATEST_VENV)/bin/python .ci/lightning_versions.py $(CONSTRAINTS) $(LATEST_PKGS)
	$(LATEST_VENV)/bin/python -m pytest -m "not slow" $(LIGHTNING_TESTS)

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
	rm -rf runs build *.egg-info src/*.egg-info $(VENV)-lock $(LATEST_VENV)
