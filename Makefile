# Two entry points: `make demo` (the main job end to end on a generated dataset) and `make test`.
# Both create or reuse the virtual environment in .venv by themselves.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
NLTK_DATA ?= $(abspath ../shared/nltk_data)
export NLTK_DATA

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python jobs/demo.py --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf runs .pytest_cache
