"""The tag of an image: a digest of exactly what its Dockerfile puts into it.

    python3 scripts/image_tag.py tag DOCKERFILE [NAME=VALUE ...]   # the tag, for these build arguments
    python3 scripts/image_tag.py base DOCKERFILE                   # the base image BASE_IMAGE names by default

Run from the build context (the repository root, or the image-source layer CodeBuild unpacks, which
holds the same files). The digest covers the Dockerfile, every file its COPY lines take from the
context (the locked dependency versions among them), and the build arguments, the base image's
resolved digest included: one tag is one image's content in every account, and a change elsewhere
(a README, the docs, the other image's code) leaves the tag, and the image, as they are.

Standard library only: it runs on CodeBuild's Python as well as the developer's.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import sys
from pathlib import Path

#: Never part of an image: Python's byte-code caches of the developer's runs.
_SKIPPED_DIRECTORIES = frozenset({"__pycache__"})


def _instructions(dockerfile: str) -> list[list[str]]:
    """The Dockerfile's instructions, each split into words, with continuation lines joined."""
    joined = dockerfile.replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def copied_sources(dockerfile: str) -> list[str]:
    """The context paths the Dockerfile's COPY and ADD lines take (not those copied from another stage)."""
    sources: list[str] = []
    for words in _instructions(dockerfile):
        if words[0].upper() not in ("COPY", "ADD"):
            continue
        arguments = words[1:]
        flags = [word for word in arguments if word.startswith("--")]
        if any(flag.startswith("--from=") for flag in flags):
            continue
        paths = [word for word in arguments if not word.startswith("--")]
        sources += paths[:-1]  # the last is the destination
    return sources


def base_image(dockerfile: str) -> str:
    """The default of the Dockerfile's BASE_IMAGE argument, the image its FROM starts from."""
    for words in _instructions(dockerfile):
        if words[0].upper() == "ARG" and words[1].startswith("BASE_IMAGE="):
            return words[1].split("=", 1)[1]
    raise SystemExit("the Dockerfile declares no ARG BASE_IMAGE=<image> before its FROM")


def _files(context: Path, source: str) -> list[Path]:
    path = context / source
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise SystemExit(f"{source}, which the Dockerfile copies, is not in the build context {context}")
    found = []
    for folder, directories, names in os.walk(path, followlinks=True):
        directories[:] = sorted(name for name in directories if name not in _SKIPPED_DIRECTORIES)
        found += [Path(folder) / name for name in names if not name.endswith(".pyc")]
    return found


def image_tag(context: Path, dockerfile: str, build_args: dict[str, str]) -> str:
    digest = hashlib.sha256()
    text = (context / dockerfile).read_text()
    digest.update(f"dockerfile {dockerfile}\n{text}\n".encode())
    for source in copied_sources(text):
        for path in sorted(_files(context, source), key=lambda item: item.relative_to(context).as_posix()):
            content = hashlib.sha256(path.read_bytes()).hexdigest()
            digest.update(f"file {path.relative_to(context).as_posix()} {content}\n".encode())
    for name, value in sorted(build_args.items()):
        digest.update(f"arg {name}={value}\n".encode())
    return digest.hexdigest()[:16]


def main(arguments: list[str]) -> None:
    if len(arguments) >= 2 and arguments[0] == "base":
        print(base_image((Path.cwd() / arguments[1]).read_text()))
    elif len(arguments) >= 2 and arguments[0] == "tag":
        pairs = [argument.split("=", 1) for argument in arguments[2:]]
        if any(len(pair) != 2 for pair in pairs):
            raise SystemExit("build arguments are NAME=VALUE")
        print(image_tag(Path.cwd(), arguments[1], dict((name, value) for name, value in pairs)))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
