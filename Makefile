# Everything a fresh machine needs, from this repository's own files.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Pytest arguments, e.g. `make test PYTEST_ARGS="-k worker -x"`.
PYTEST_ARGS ?=

.PHONY: install browser lint test unit lock local serve clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned in pyproject.toml to the build this project is tested with (torch==2.14.1).
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

-include make/sam.mk
-include make/checks.mk

# The demo page's browser test drives Debian's Chromium through its ChromeDriver (browser builds
# downloaded by test tools do not work on the project's machines).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver; }

## The whole suite as CI runs it: lint and types, SAM template checks, static checks of the template, then every test.
test: install browser lint sam-validate sam-build template-checks unit

## ruff (lint and format) and mypy; each function's handler is an app.py, so those are typed one by one.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	for handler in functions/*/app.py; do $(BIN)/mypy $$handler || exit 1; done

## The two images' lock files (batch_job/requirements.lock, functions/query/requirements.lock), resolved for
## Python 3.12 on x86_64 Linux, preferring the versions the tests run; commit them with the change that needs them.
lock: install
	$(BIN)/python -m pip freeze > .lock-prefer.txt
	$(BUILD_PYTHON_ENV) python3.12 scripts/lock.py --prefer .lock-prefer.txt
	rm .lock-prefer.txt

unit: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## The main job: the whole pipeline on an embedded AWS emulator. LOCAL_ARGS, e.g. "my-photos --pretrained none".
LOCAL_ARGS ?=
local: install
	$(BIN)/clip-pipeline local $(LOCAL_ARGS)

## The query API and demo page over a stack's vectors, e.g. SERVE_ARGS="--endpoint-url http://127.0.0.1:5000".
SERVE_ARGS ?=
serve: install
	$(BIN)/clip-pipeline serve $(SERVE_ARGS)

clean:
	rm -rf $(VENV) .venv-sam .venv-checks .aws-sam .pytest_cache
