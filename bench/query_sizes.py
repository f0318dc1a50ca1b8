"""What the query API's Lambda image holds, as far as a machine without Docker can measure it: the
checkpoint, the baked label vectors, and the installed size of every distribution the `[query]`
extra requires, recursively, from each distribution's RECORD (importlib.metadata), in groups. torch
here is PyPI's CUDA build, not the CPU build the image installs: it is shown for scale only."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bench._harness import REPOSITORY

MB = 1e6

#: Libraries only the CUDA build of torch brings; the CPU build the Lambda image installs has none.
CUDA_ONLY_PREFIXES = ("nvidia-", "cuda-", "triton")
TORCH_BUILD = ("torch", "torchvision")


def installed_bytes(distribution: metadata.Distribution) -> int:
    total = 0
    for file in distribution.files or []:
        path = Path(str(distribution.locate_file(file)))
        if path.is_file():
            total += path.stat().st_size
    return total


def requirement_closure(roots: Sequence[str], stop: Callable[[str], bool]) -> dict[str, metadata.Distribution]:
    """Every installed distribution `roots` (PEP 508, extras included) require, recursively, not
    descending into the distributions `stop` names (which are still included)."""
    found: dict[str, metadata.Distribution] = {}
    done: dict[str, set[str]] = {}
    pending = [Requirement(root) for root in roots]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        extras = set(requirement.extras)
        if name in done and extras <= done[name]:
            continue
        try:
            distribution = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            continue
        done.setdefault(name, set()).update(extras)
        found[name] = distribution
        if stop(name):
            continue
        for text in distribution.requires or []:
            child = Requirement(text)
            if child.marker is None or any(child.marker.evaluate({"extra": extra}) for extra in {"", *done[name]}):
                pending.append(child)
    return found


def sized(distributions: dict[str, metadata.Distribution]) -> dict[str, float]:
    return dict(sorted(((name, installed_bytes(d) / MB) for name, d in distributions.items()), key=lambda item: -item[1]))


def source_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and "__pycache__" not in path.parts)


def bench_sizes(checkpoint: Path, cache_dir: Path) -> dict[str, Any]:
    def is_torch(name: str) -> bool:
        return name in TORCH_BUILD or name.startswith(CUDA_ONLY_PREFIXES)

    project = canonicalize_name("clip-embedding-pipeline")
    api = requirement_closure(["clip-embedding-pipeline[query]"], is_torch)
    api = {name: d for name, d in api.items() if not is_torch(name) and name != project}
    # What torch and torchvision need besides the CUDA libraries: the CPU build needs it too.
    torch_side = requirement_closure(list(TORCH_BUILD), lambda name: name.startswith(CUDA_ONLY_PREFIXES))
    torch_requirements = {name: d for name, d in torch_side.items() if not is_torch(name) and name not in api}
    everything = requirement_closure(list(TORCH_BUILD), lambda name: False)
    cuda = {name: d for name, d in everything.items() if name.startswith(CUDA_ONLY_PREFIXES)}
    torch_build = {name: d for name, d in torch_side.items() if name in TORCH_BUILD}
    packages = {
        "clip_shared": REPOSITORY / "layers" / "shared" / "clip_shared",
        "clip_worker": REPOSITORY / "batch_job" / "clip_worker",
        "clip_query": REPOSITORY / "functions" / "query" / "clip_query",
        "clip_pipeline": REPOSITORY / "cli" / "clip_pipeline",
    }
    groups = {
        "api_dependencies": sized(api),
        "torch_requirements": sized(torch_requirements),
        "torch_cuda_build": sized(torch_build),
        "cuda_libraries": sized(cuda),
        "project_code": {name: source_bytes(folder) / MB for name, folder in packages.items()},
    }
    sizes = {
        "checkpoint_mb": checkpoint.stat().st_size / MB,
        "baked_label_vectors_mb": source_bytes(cache_dir) / MB,
        "totals_mb": {name: sum(group.values()) for name, group in groups.items()},
        **groups,
    }
    sizes["image_without_torch_and_base_mb"] = image_mb(sizes)
    return sizes


def image_mb(sizes: dict[str, Any]) -> float:
    """What this machine can measure of the image: all of it but torch and the Lambda base image."""
    totals = sizes["totals_mb"]
    return (
        sizes["checkpoint_mb"]
        + sizes["baked_label_vectors_mb"]
        + totals["api_dependencies"]
        + totals["torch_requirements"]
        + totals["project_code"]
    )
