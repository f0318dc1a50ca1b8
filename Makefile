# Everything a fresh machine needs, from this repository's own files.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Pytest arguments, e.g. `make test PYTEST_ARGS="-k worker -x"`.
PYTEST_ARGS ?=

.PHONY: install test unit local clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned in pyproject.toml to the build this project is tested with (torch==2.14.1).
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

-include make/sam.mk

## The whole suite as CI runs it: SAM template checks, then every test.
test: install sam-validate sam-build unit

unit: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## The main job: the whole pipeline on an embedded AWS emulator. LOCAL_ARGS, e.g. "my-photos --pretrained none".
LOCAL_ARGS ?=
local: install
	$(BIN)/clip-pipeline local $(LOCAL_ARGS)

clean:
	rm -rf $(VENV) .venv-sam .aws-sam .pytest_cache
