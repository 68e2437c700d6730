# `make test` and `make demo` work on a fresh clone: they create the virtual environment on first use.
# `make test-all` (what CI runs) tests the two ends of the supported range: the oldest jax on
# Python 3.11 and the newest jax the package index has on Python 3.12 (in .venv312).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hbpjax-installed
# pyenv's Python 3.12 where `python3.12` itself is not on the PATH.
PYTHON312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
# The oldest jax the package supports (pyproject.toml), pinned for the Python 3.11 run.
OLDEST_JAX ?= jax==0.10.2 jaxlib==0.10.2

.PHONY: test test-newest test-all demo bench bench-accel docs lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]' $(EXTRA_PINS)
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2

# The newest jax (pip's choice, upgraded on every run) on Python 3.12, in its own environment.
test-newest:
	test -x .venv312/bin/python || $(PYTHON312) -m venv .venv312
	.venv312/bin/python -m pip install --quiet --upgrade pip
	.venv312/bin/python -m pip install --quiet --upgrade -e '.[test]' jax jaxlib
	.venv312/bin/python -c "import jax, sys; print('newest: Python', sys.version.split()[0], 'jax', jax.__version__)"
	.venv312/bin/python -m pytest -q -n 2

test-all:
	$(MAKE) test EXTRA_PINS="$(OLDEST_JAX)"
	$(PY) -c "import jax, sys; print('oldest: Python', sys.version.split()[0], 'jax', jax.__version__)"
	$(MAKE) test-newest

demo: $(STAMP)
	$(PY) benchmarks/demo.py

bench: $(STAMP)
	$(PY) benchmarks/core_speed.py

# The paper's settings on whatever accelerator jax finds (install the jax for it first, e.g.
# `.venv/bin/pip install -U "jax[cuda12]"`); on a CPU, a small mode that says so.
bench-accel: $(STAMP)
	$(PY) benchmarks/accelerator.py

# The documentation site (mkdocs-material + mkdocstrings + mkdocs-jupyter) into site/, warnings as
# errors. The test run builds it too (tests/test_package.py), as it runs ruff and mypy.
docs: $(STAMP)
	$(PY) -m mkdocs build --strict --site-dir site

lint: $(STAMP)
	$(PY) -m ruff check hbpjax
	$(PY) -m mypy

clean:
	rm -rf $(VENV) .venv312 .pytest_cache build dist site *.egg-info .mypy_cache .ruff_cache
