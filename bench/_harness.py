"""What the query benchmarks share: the machine and versions a run was on, its JSON file, and the
seeded random weights they run ViT-B-32 with (no weights can be downloaded where they are run)."""

from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import open_clip
import PIL
import skimage
import torch
from PIL import Image, ImageOps

REPOSITORY = Path(__file__).resolve().parents[1]
PHOTO = Path(skimage.__file__).parent / "data" / "chelsea.png"
JPEG_QUALITY = 90


def environment() -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPOSITORY, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"], cwd=REPOSITORY, capture_output=True, text=True, check=True
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    return {
        "commit": commit + ("+dirty" if dirty else ""),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "pillow": PIL.__version__,
        "fastapi": metadata.version("fastapi"),
        "mangum": metadata.version("mangum"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def write_json(path: Path | None, results: dict[str, Any]) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")


def save_random_checkpoint(model: str, path: Path) -> Path:
    """Seeded random weights in the checkpoint format open_clip loads from a file path: the
    architecture and size of the real weights, loaded through the same code."""
    torch.manual_seed(0)
    network = open_clip.create_model(model)
    torch.save({"state_dict": network.state_dict()}, path)
    del network
    return path


def jpeg_photo(size: tuple[int, int]) -> bytes:
    """scikit-image's cat, cropped to 4:3 and resized with LANCZOS, as a JPEG of quality 90."""
    image = ImageOps.fit(Image.open(PHOTO).convert("RGB"), size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()
