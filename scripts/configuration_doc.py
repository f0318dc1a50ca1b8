"""docs/configuration.md's table of stack parameters, made from template.yaml's Parameters.

    python scripts/configuration_doc.py   # rewrites the table after a parameter changes

template.yaml is the one home of each parameter's default and meaning (`sam deploy --guided` shows
the same text); tests/test_docs.py fails while the table differs from what this prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from samtranslator.yaml_helper import yaml_parse

REPOSITORY = Path(__file__).resolve().parents[1]
TEMPLATE = REPOSITORY / "template.yaml"
DOCUMENT = REPOSITORY / "docs" / "configuration.md"
BEGIN = "<!-- parameters: made from template.yaml by scripts/configuration_doc.py; edit the template, then run it -->"
END = "<!-- end of parameters -->"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def _default(parameter: dict[str, Any]) -> str:
    default = parameter.get("Default")
    if default is None:
        return "(required)"
    if default == "":
        return "(empty)"
    if isinstance(default, int) and default >= 10_000:
        return f"`{default}` ({default:,})"
    return f"`{default}`"


def _allowed(parameter: dict[str, Any]) -> str:
    if "AllowedValues" in parameter:
        return ", ".join(f"`{value}`" for value in parameter["AllowedValues"])
    bounds = [
        f"≥ {parameter['MinValue']}" if "MinValue" in parameter else "",
        f"≤ {parameter['MaxValue']}" if "MaxValue" in parameter else "",
    ]
    if "AllowedPattern" in parameter:
        bounds.append(f"matches `{_cell(parameter['AllowedPattern'])}`")
    return ", ".join(bound for bound in bounds if bound)


def table(template: dict[str, Any]) -> str:
    """Every parameter, in the groups `sam deploy --guided` and the console show them, then the rest."""
    parameters: dict[str, dict[str, Any]] = template["Parameters"]
    groups = template.get("Metadata", {}).get("AWS::CloudFormation::Interface", {}).get("ParameterGroups", [])
    grouped = [(group["Label"]["default"], list(group["Parameters"])) for group in groups]
    listed = {name for _, names in grouped for name in names}
    rest = [name for name in parameters if name not in listed]
    if rest:
        grouped.append(("Other settings", rest))
    lines = [BEGIN, ""]
    for label, names in grouped:
        lines += [f"### {label}", "", "| parameter | default | allowed | meaning |", "|---|---|---|---|"]
        for name in names:
            parameter = parameters[name]
            cells = [f"`{name}`", _default(parameter), _allowed(parameter), _cell(parameter.get("Description", ""))]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def expected_document(document: str, template_text: str) -> str:
    """`document` with its parameter table replaced by the one `template_text` makes."""
    head, _, rest = document.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return head + table(yaml_parse(template_text)) + tail


def main() -> None:
    DOCUMENT.write_text(expected_document(DOCUMENT.read_text(), TEMPLATE.read_text()))


if __name__ == "__main__":
    main()
