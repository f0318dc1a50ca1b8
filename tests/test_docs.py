"""The docs say what the code does: defaults, settings and commands are checked against their one home."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main
from samtranslator.yaml_helper import yaml_parse

from clip_pipeline.app import app
from clip_worker import config as worker_config
from clip_worker.config import WorkerConfig
from scripts import configuration_doc

REPOSITORY = Path(__file__).resolve().parents[1]
README = REPOSITORY / "README.md"
DOCS = [README, *sorted((REPOSITORY / "docs").glob("*.md")), *sorted(REPOSITORY.glob("*.md"))]
TEMPLATE = yaml_parse(configuration_doc.TEMPLATE.read_text())


def test_the_configuration_reference_is_the_template_s_parameters() -> None:
    document = configuration_doc.DOCUMENT.read_text()
    assert configuration_doc.BEGIN in document and configuration_doc.END in document
    assert document == configuration_doc.expected_document(document, configuration_doc.TEMPLATE.read_text()), (
        "docs/configuration.md differs from template.yaml: run `python scripts/configuration_doc.py`"
    )


def test_every_parameter_says_what_it_does() -> None:
    """`sam deploy --guided` shows each description; a bare name tells a deployer nothing."""
    bare = [name for name, parameter in TEMPLATE["Parameters"].items() if len(parameter.get("Description", "")) < 20]
    assert bare == []


def test_the_parameters_the_reference_says_reach_the_worker_do() -> None:
    text = configuration_doc.DOCUMENT.read_text()
    claimed = re.findall(r"`(\w+)`\s+→\s+`(\w+)`", text)
    environment = {
        item["Name"]: item["Value"]
        for item in TEMPLATE["Resources"]["WorkerJobDefinition"]["Properties"]["ContainerProperties"]["Environment"]
    }
    assert len(claimed) >= 8
    for parameter, variable in claimed:
        assert environment.get(variable) == {"Ref": parameter}, (parameter, variable)


def _worker_rows() -> dict[str, str]:
    """The README's worker settings table: each variable and the default it documents."""
    section = README.read_text().split("## Worker configuration", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].startswith("`"):
            names = re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0])
            for name in names:
                rows[name] = cells[1] if len(names) == 1 else ""
    return rows


def test_every_variable_the_worker_reads_is_documented() -> None:
    read = set(re.findall(r'"([A-Z][A-Z0-9_]{2,})"', Path(worker_config.__file__).read_text()))
    assert read, "the worker's config no longer names its variables as string literals"
    assert sorted(read - set(_worker_rows())) == []


def _worker_defaults() -> dict[str, str]:
    """The variables documented with one default value (not "(required)" or "256 on CUDA, 32 on CPU")."""
    found = {}
    for variable, documented in _worker_rows().items():
        single = re.fullmatch(r"`?([^`\s,(]+)`?(?: \(.*\))?", documented)
        if single:
            found[variable] = single.group(1)
    return found


def test_most_worker_defaults_are_checked() -> None:
    assert len(_worker_defaults()) >= 12


@pytest.mark.parametrize("variable", sorted(_worker_defaults()))
def test_each_documented_worker_default_is_the_code_s(variable: str) -> None:
    """Setting a variable to the default the README gives it changes nothing."""
    required = {"MANIFEST_URI": "s3://bucket/manifest.json", "OUTPUT_BUCKET": "output"}
    changed = WorkerConfig.from_env({**required, variable: _worker_defaults()[variable]})
    assert changed == WorkerConfig.from_env(required), _worker_rows()[variable]


def _cli_options() -> dict[str, set[str]]:
    group = typer.main.get_command(app)
    commands = getattr(group, "commands", {})
    return {
        name: {option for param in command.params for option in (*param.opts, *param.secondary_opts)}
        for name, command in commands.items()
    }


def test_every_command_and_option_the_docs_show_exists() -> None:
    options = _cli_options()
    wrong = []
    for document in DOCS:
        for line in document.read_text().splitlines():
            for match in re.finditer(r"clip-pipeline ([a-z][a-z-]*)([^`|#]*)", line):
                command, rest = match.groups()
                if command not in options:
                    wrong.append(f"{document.name}: clip-pipeline {command}")
                    continue
                wrong += [
                    f"{document.name}: clip-pipeline {command} {option}"
                    for option in re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest)
                    if option not in options[command] | {"--help"}
                ]
    assert wrong == []
