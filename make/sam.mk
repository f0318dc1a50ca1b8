# The SAM part of the Makefile (included by it): the CLI in its own virtual environment, so its pins
# never fight the dev venv's, and the two checks CI runs on every change.
SAM_PYTHON ?= python3.11
SAM_VENV := .venv-sam
SAM := $(SAM_VENV)/bin/sam
SAM_CLI_VERSION ?= 1.170.0
# `sam validate --lint` needs a region, not an account.
SAM_REGION ?= us-east-1
# `sam build` needs the function runtime's interpreter, python3.12: any 3.12 will do. With pyenv, its
# newest 3.12 (pyenv's shims answer only for the versions selected); without, the python3.12 on PATH.
SAM_BUILD_PYTHON ?= $(shell command -v pyenv >/dev/null && pyenv versions --bare | grep -E '^3\.12(\.[0-9]+)?$$' | sort -V | tail -1)
BUILD_PYTHON_ENV := $(if $(SAM_BUILD_PYTHON),PYENV_VERSION=$(SAM_BUILD_PYTHON))
export SAM_CLI_TELEMETRY = 0

.PHONY: sam-install sam-validate sam-build

sam-install: $(SAM_VENV)/.installed

$(SAM_VENV)/.installed: make/sam.mk
	test -x $(SAM_VENV)/bin/python || $(SAM_PYTHON) -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SAM_VENV)/bin/python -m pip install --quiet 'aws-sam-cli==$(SAM_CLI_VERSION)'
	touch $@

sam-validate: sam-install
	$(SAM) validate --lint --region $(SAM_REGION)

sam-build: sam-install
	$(BUILD_PYTHON_ENV) $(SAM) build
