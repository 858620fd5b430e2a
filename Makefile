# The two set-up-free commands: `make quickstart` and `make test`.
# `make quickstart ARGS="--seed 1 --output runs/quickstart-seed1"` passes options to python -m lit_align.quickstart.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: quickstart test test-oldest install clean

# The same suite on the oldest dependency releases pyproject.toml allows (.ci/oldest-constraints.txt), in its own
# virtualenv; not part of `make test`, run it when a floor changes. torch stays 2.13.0 (the CPU wheel on this disk)
# unless OLDEST_TORCH names another: `make test-oldest OLDEST_TORCH=2.6.0` tries torch's floor too (a CUDA build
# from PyPI, about 3 GB with its NVIDIA libraries; it runs on the CPU).
OLDEST := .venv-oldest
OLDEST_TORCH ?= 2.13.0

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

test-oldest:
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install --quiet --upgrade pip
	$(OLDEST)/bin/pip install --quiet torch==$(OLDEST_TORCH)
	$(OLDEST)/bin/pip install --quiet -e ".[test]" -c .ci/oldest-constraints.txt torch==$(OLDEST_TORCH)
	$(OLDEST)/bin/python -m pytest -q -m "" tests

clean:
	rm -rf $(VENV) $(OLDEST) runs
