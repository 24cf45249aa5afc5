# Thin targets: every step can be run by hand (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned: the CPU wheel on a CPU box, PyPI's CUDA build on a GPU box.
TORCH ?= torch==2.13.0
MODELS := $(shell $(PYTHON) -c "import os,pathlib;print(pathlib.Path(os.environ.get('MISTRALRS_CLI_CACHE') or pathlib.Path.home()/'.cache'/'mistralrs-cli')/'models')")
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: run test venv models ggml clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m compileall -q mistralrs_cli  # an editable install has no bytecode: each start would compile ~50 modules
	touch $@

venv: $(VENV)/.installed

models: venv
	$(PY) scripts/fetch_models.py

run: venv
	$(PY) scripts/fetch_models.py smollm2
	$(VENV)/bin/mistralrs --max-tokens 256 --prompt "$(PROMPT)" gguf -f "$(MODELS)/SmolLM2-135M-Instruct.Q4_1.gguf"

# llama.cpp's libggml-base, the tests' reference for quantization (built once, cached)
ggml: venv
	$(PY) tests/ggml_reference.py

test: models ggml
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
