# Static checks of template.yaml (included by the Makefile): checkov, and cfn-lint with the serverless
# rules (cfn-lint-serverless). They live in their own virtual environment, since checkov pins many
# packages. Every finding is fixed, or justified next to its resource in the template (a checkov skip
# with its comment, a cfn-lint ignore under a comment saying why), so any finding fails CI.
CHECKS_PYTHON ?= python3.11
CHECKS_VENV := .venv-checks
CHECKOV_VERSION ?= 3.3.30
CFN_LINT_VERSION ?= 1.58.0
CFN_LINT_SERVERLESS_VERSION ?= 0.3.6

.PHONY: checks-install template-checks

checks-install: $(CHECKS_VENV)/.installed

$(CHECKS_VENV)/.installed: make/checks.mk
	test -x $(CHECKS_VENV)/bin/python || $(CHECKS_PYTHON) -m venv $(CHECKS_VENV)
	$(CHECKS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CHECKS_VENV)/bin/python -m pip install --quiet 'checkov==$(CHECKOV_VERSION)' \
		'cfn-lint==$(CFN_LINT_VERSION)' 'cfn-lint-serverless==$(CFN_LINT_SERVERLESS_VERSION)'
	touch $@

# checkov --skip-download: offline, without Prisma Cloud's guideline links.
template-checks: checks-install
	$(CHECKS_VENV)/bin/cfn-lint template.yaml --append-rules cfn_lint_serverless.rules
	$(CHECKS_VENV)/bin/checkov --file template.yaml --framework cloudformation --compact --quiet --skip-download
