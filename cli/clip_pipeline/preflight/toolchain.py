"""The deployer's machine: `sam build` needs a Python 3.12 on PATH for the python3.12 functions and layer."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from clip_pipeline.preflight.findings import Check, Status

#: The executables `sam build` tries for a python3.12 runtime, in its order.
SAM_PYTHONS = ("python3.12", "python", "python3")


def check_sam_build_python(search_path: str | None = None) -> Check:
    """Finds, as `sam build` does, an executable on PATH that is Python 3.12."""
    directories = (search_path if search_path is not None else os.environ.get("PATH", "")).split(os.pathsep)
    tried = []
    for name in SAM_PYTHONS:
        for directory in filter(None, directories):
            candidate = Path(directory) / name
            if not (candidate.is_file() and os.access(candidate, os.X_OK)):
                continue
            tried.append(str(candidate))
            probe = subprocess.run(
                [str(candidate), "-c", "import sys; assert sys.version_info[:2] == (3, 12)"],
                capture_output=True,
                stdin=subprocess.DEVNULL,
                timeout=60,
            )
            if probe.returncode == 0:
                return Check("sam-build-python", Status.PASS, f"`sam build` finds Python 3.12 at {candidate}")
    return Check(
        "sam-build-python",
        Status.FAIL,
        "no Python 3.12 on PATH"
        + (f" ({', '.join(tried)} are other versions)" if tried else "")
        + ': `sam build` stops with "Binary validation failed for python". Install Python 3.12; with pyenv, '
        "build with PYENV_VERSION=<a 3.12 version> as `make sam-build` does",
    )
