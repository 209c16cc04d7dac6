# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch, pinned; TORCH_INDEX picks the index it comes from (README: which build each index serves).
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=
# DeepSpeed compiles its CPU ops (shared-memory allreduce) on first use: keep them between runs.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/build/torch_extensions
export PYTHONUNBUFFERED := 1
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e ".[test,demo]" "$(TORCH)"
	touch $@

demo: install
	PATH=$(CURDIR)/$(BIN):$$PATH bash tools/demo.sh

# DISTLM_TEST_EXTRAS=required: a test whose optional dependency (lm-eval) is missing fails instead of skipping.
test: install
	DISTLM_TEST_EXTRAS=required $(BIN)/python -m pytest -q --durations=30 tests

clean:
	rm -rf runs data outputs wandb build .pytest_cache
