"""What the project's own conventions ask of every Python file, checked where a reviewer would miss it."""

from __future__ import annotations

import re
import subprocess

from clip_pipeline.emulator import REPOSITORY

_SUPPRESSION = re.compile(r"#\s*(noqa|type:\s*ignore)\b")
# A lint suppression names its codes then, after ` - ` (or a type one after `  # `), why: the convention asks the reason.
_WITH_REASON = re.compile(r"#\s*(noqa(:\s*[A-Z]+\d+(,\s*[A-Z]+\d+)*)?|type:\s*ignore(\[[^\]]*\])?)\s*(-|#)\s*\S.{3,}")


def test_every_suppressed_lint_or_type_finding_says_why() -> None:
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=REPOSITORY, capture_output=True, text=True, check=True).stdout.split()
    bare = [
        f"{name}:{number}: {line.strip()}"
        for name in files
        for number, line in enumerate((REPOSITORY / name).read_text(encoding="utf-8").splitlines(), 1)
        if _SUPPRESSION.search(line) and not _WITH_REASON.search(line)
    ]
    assert not bare, "suppressions without a reason:\n" + "\n".join(bare)
