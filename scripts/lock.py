"""Writes the two images' lock files: every Python distribution each installs, at one version.

    make lock        # runs: python3.12 scripts/lock.py [--prefer CONSTRAINTS]

pip resolves pyproject.toml's dependencies (the `worker` extra for batch_job/Dockerfile, the `query`
extra for functions/query/Dockerfile) for CPython 3.12 on manylinux x86_64, the images' platform,
without installing anything, preferring the versions in `--prefer` (the tests' environment, `pip
freeze` of .venv) where they fit. The Dockerfiles install with `--constraint` on the lock, and the
image tags cover it (scripts/image_tag.py): a rebuild, or another account, gets what was locked.

The query image takes torch and torchvision from PyTorch's CPU index before anything else, so its
lock leaves out what only the CUDA build of torch needs (nvidia-*, cuda-*, triton). Run it with
Python 3.12: pip evaluates environment markers for the interpreter it runs on.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCKS = {"worker": ROOT / "batch_job" / "requirements.lock", "query": ROOT / "functions" / "query" / "requirements.lock"}
#: glibc 2.34 is the older of the two bases (the Lambda image's Amazon Linux 2023; Debian bookworm has 2.36).
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(34, 4, -1)] + [
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
]
#: Needed by PyPI's CUDA build of torch only.
CUDA_ONLY = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")
PROJECT = "clip-embedding-pipeline"


def requirements(extra: str) -> list[str]:
    """The extra's requirements with the project's own extras expanded (query includes worker)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras: dict[str, list[str]] = project["optional-dependencies"]
    found = list(project["dependencies"])
    for requirement in extras[extra]:
        nested = re.fullmatch(rf"{PROJECT}\[(.+)\]", requirement.replace(" ", ""))
        found += requirements(nested.group(1)) if nested else [requirement]
    return list(dict.fromkeys(found))


def preferences(freeze: str) -> str:
    """`pip freeze` output as constraints: pinned distributions only, local versions (2.14.1+cpu) as their public one."""
    pins = [line.split("+", 1)[0] for line in freeze.splitlines() if "==" in line and not line.startswith(("-e", "#"))]
    return "\n".join(pin for pin in pins if not pin.lower().startswith(PROJECT)) + "\n"


def resolve(extra: str, prefer: Path | None) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as folder:
        wanted, report = Path(folder) / "requirements.txt", Path(folder) / "report.json"
        wanted.write_text("\n".join(requirements(extra)) + "\n")
        if prefer:
            (Path(folder) / "prefer.txt").write_text(preferences(prefer.read_text()))
            prefer = Path(folder) / "prefer.txt"
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed", "--only-binary=:all:"]
        command += ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--target", str(Path(folder) / "t")]
        command += [argument for platform in PLATFORMS for argument in ("--platform", platform)]
        command += ["--report", str(report), "-r", str(wanted)] + (["-c", str(prefer)] if prefer else [])
        subprocess.run(command, check=True)
        installed = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"] for item in installed}


def lock_text(extra: str, pins: dict[str, str]) -> str:
    kept = {name: version for name, version in pins.items() if extra != "query" or not CUDA_ONLY.match(name)}
    header = [
        f"# The {extra} image's Python dependencies, locked by scripts/lock.py (`make lock`) for CPython 3.12,",
        "# manylinux x86_64. Installed with `pip install --constraint`; the image's tag covers this file.",
    ]
    return "\n".join(header + [f"{name}=={version}" for name, version in sorted(kept.items())]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefer", type=Path, help="constraints to prefer where they fit (e.g. `pip freeze` of the tests' venv)")
    arguments = parser.parse_args()
    if sys.version_info[:2] != (3, 12):
        raise SystemExit("run with Python 3.12 (the images' Python): pip evaluates markers for the interpreter it runs on")
    for extra, path in LOCKS.items():
        path.write_text(lock_text(extra, resolve(extra, arguments.prefer)))
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
