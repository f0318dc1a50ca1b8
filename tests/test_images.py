"""The two images are built where no test runs (CodeBuild, or `docker build` on a machine with Docker):
what they copy is checked here against what pyproject.toml installs, what their tags cover against
what they copy, and their lock files against pyproject.toml's requirements."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from clip_pipeline.emulator import REPOSITORY
from scripts import image_tag, lock

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


ARGS = {
    "BASE_IMAGE": "public.ecr.aws/docker/library/python@sha256:" + "a" * 64,
    "CLIP_MODEL": "ViT-B-32",
    "CLIP_PRETRAINED": "openai",
}


@pytest.fixture
def context(tmp_path: Path) -> Path:
    """The build context as CodeBuild unpacks it: scripts/image-source with its links resolved, as `sam deploy` zips it."""
    folder = tmp_path / "context"
    shutil.copytree(REPOSITORY / "scripts" / "image-source", folder, symlinks=False, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_tag_is_the_same_from_the_repository_and_from_codebuilds_source(dockerfile: str, context: Path) -> None:
    # scripts/build-and-push.sh tags from the repository, CodeBuild from the layer: one content, one tag.
    assert image_tag.image_tag(REPOSITORY, dockerfile, ARGS) == image_tag.image_tag(context, dockerfile, ARGS)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_tag_changes_with_what_goes_into_the_image_and_nothing_else(dockerfile: str, context: Path) -> None:
    before = image_tag.image_tag(context, dockerfile, ARGS)
    other = DOCKERFILES[1 - DOCKERFILES.index(dockerfile)]

    # Not in the image: documentation, the other image's Dockerfile, byte-code caches, the build scripts.
    (context / "README.md").write_text("# rewritten\n")
    (context / other).write_text((context / other).read_text() + "# edited\n")
    (context / "batch_job" / "clip_worker" / "__pycache__").mkdir(exist_ok=True)
    (context / "batch_job" / "clip_worker" / "__pycache__" / "runner.cpython-312.pyc").write_bytes(b"\0")
    (context / "scripts" / "push-image.sh").write_text("# edited\n")
    assert image_tag.image_tag(context, dockerfile, ARGS) == before

    # In the image: its lock, its code, the shared code, the Dockerfile, the base image's digest, the weights.
    lock_file = "batch_job/requirements.lock" if dockerfile == DOCKERFILES[0] else "functions/query/requirements.lock"
    changes = [
        (lock_file, "numpy==2.4.7\n"),
        ("batch_job/clip_worker/runner.py", "# edited\n"),
        ("layers/shared/clip_shared/keys.py", "# edited\n"),
        (dockerfile, "# edited\n"),
    ]
    seen = {before}
    for path, addition in changes:
        (context / path).write_text((context / path).read_text() + addition)
        seen.add(image_tag.image_tag(context, dockerfile, ARGS))
    seen.add(image_tag.image_tag(context, dockerfile, {**ARGS, "BASE_IMAGE": ARGS["BASE_IMAGE"].replace("a", "b")}))
    seen.add(image_tag.image_tag(context, dockerfile, {**ARGS, "CLIP_PRETRAINED": "laion2b_s34b_b79k"}))
    assert len(seen) == len(changes) + 3


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_each_image_installs_its_lock_and_copies_no_readme(dockerfile: str) -> None:
    text = (REPOSITORY / dockerfile).read_text()
    copied = image_tag.copied_sources(text)
    [lock_file] = [source for source in copied if source.endswith("requirements.lock")]
    assert lock.LOCKS["worker" if dockerfile == DOCKERFILES[0] else "query"] == REPOSITORY / lock_file
    assert "--constraint requirements.lock" in text
    assert "README.md" not in copied


@pytest.mark.parametrize("extra", ["worker", "query"])
def test_the_locks_pin_every_requirement_at_a_version_it_allows(extra: str) -> None:
    pins = {}
    for line in lock.LOCKS[extra].read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name] = version
    for text in lock.requirements(extra):
        requirement = Requirement(text)
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{extra}: {name} is not locked"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{extra}: {name}=={pins[name]} vs {text}"
    # The query image runs torch's CPU build: nothing only PyPI's CUDA build needs is locked for it.
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    if extra == "query":
        assert not [name for name in pins if lock.CUDA_ONLY.match(name)]
    else:
        assert [name for name in pins if name.startswith("nvidia-")]
