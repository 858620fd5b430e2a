# The two set-up-free commands: `make quickstart` and `make test`.
# `make quickstart ARGS="--seed 1 --output runs/quickstart-seed1"` passes options to python -m lit_align.quickstart.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: quickstart test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: a CPU wheel, so nothing pulls the multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/python -m lit_align.quickstart $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "" tests

clean:
	rm -rf $(VENV) runs
