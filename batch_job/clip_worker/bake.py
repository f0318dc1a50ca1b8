"""Fill an image's cache at build time, through the very code that reads it at run time: the model's
weights, and the default label set's text vectors (the text tower needs many CPU seconds for them).

    python -m clip_worker.bake MODEL PRETRAINED CACHE_DIR
"""

from __future__ import annotations

import sys

from clip_worker.labels import DEFAULT_LABELS, LabelSet
from clip_worker.model import load


def main(argv: list[str]) -> None:
    name, pretrained, cache_dir = argv
    LabelSet.cached(load(name, pretrained, device="cpu", cache_dir=cache_dir), DEFAULT_LABELS, cache_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
