# The two commands (README): `make demo` and `make test`. Each sets itself up
# on a fresh machine that has only python3: a virtualenv in .venv, then an
# editable install of this package with its test extras.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
WORKDIR ?= runs/demo
PYTEST_ARGS ?=
# `make test` runs every test not marked `slow` (pytest.ini: real training runs,
# child processes, kills, large compiles) in parallel (pytest-xdist), one file per
# worker at a time (--dist loadfile: module fixtures are built once); 2 workers by
# default, at most 4 (each worker is a JAX process with 8 fake devices, ~3 GB).
# `make test-slow` runs the slow ones; `make test-all` both (what .ci/run does).
# TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -lt 2 ] && n=2; [ $$n -gt 4 ] && n=4; echo $$n)

.PHONY: install demo test test-slow test-all clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m broadface_jax.main --config configs/demo.py --workdir $(WORKDIR)

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" tests $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m slow tests $(PYTEST_ARGS)

test-all: test test-slow

clean:
	rm -rf $(VENV) runs
