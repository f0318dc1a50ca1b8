"""The two images are built where no test runs (CodeBuild, or `docker build` on a machine with Docker):
what they copy is checked here against what pyproject.toml installs."""

from __future__ import annotations

import tomllib

import pytest

from clip_pipeline.emulator import REPOSITORY

DOCKERFILES = ["batch_job/Dockerfile", "functions/query/Dockerfile"]
IGNORES = [".dockerignore", "scripts/image-source/.dockerignore"]


def package_folders() -> list[str]:
    """The folders of every top-level package: `pip install .` needs them all, whichever extra it installs."""
    setuptools = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["tool"]["setuptools"]
    return sorted({folder for name, folder in setuptools["package-dir"].items() if "." not in name})


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_each_image_copies_every_package_pip_installs(dockerfile: str) -> None:
    copied = {line.split()[1] for line in (REPOSITORY / dockerfile).read_text().splitlines() if line.startswith("COPY ")}
    assert set(package_folders()) <= copied


@pytest.mark.parametrize("ignore", IGNORES)
def test_the_build_context_lets_every_package_through(ignore: str) -> None:
    allowed = {
        line.removeprefix("!").removesuffix("/**")
        for line in (REPOSITORY / ignore).read_text().splitlines()
        if line.startswith("!")
    }
    assert set(package_folders()) <= allowed


def test_codebuilds_source_holds_every_package() -> None:
    # scripts/image-source is the context `sam deploy` uploads for CodeBuild: links to exactly these folders.
    for folder in package_folders():
        assert (REPOSITORY / "scripts/image-source" / folder / "__init__.py").is_file(), folder
