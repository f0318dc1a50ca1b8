"""open_clip's evaluation transform, at a cost bounded by the model's input, never by the image's shape.

open_clip's usual transform resizes the shortest side to the input size, then crops the centre:
an 85-byte 40000x1 PNG becomes an 8,960,000x224 intermediate (9.7 GB, 19 s) before the crop
throws nearly all of it away. Pillow can resample just the region the crop keeps (`resize`'s
`box`), with the same filter taps over the same source pixels, so the result is bit-identical to
resize-then-crop while the work is that of one input-sized image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms.functional import pil_modes_mapping

#: For a transform this module does not know step by step, the longest a picture may be relative to
#: its shortest side before the centre it keeps is cut out first. No open_clip model crops wider than
#: 1:1, so this keeps everything such a crop could see, with room for the resampling filter.
MAX_ASPECT = 4


class Preprocess:
    """Callable like open_clip's transform (PIL image -> normalised CHW tensor); `transforms` lists its steps."""

    def __init__(self, compose: Callable[[Image.Image], torch.Tensor]) -> None:
        self.compose = compose
        self.transforms: Sequence[Any] = list(getattr(compose, "transforms", ()))
        self._shortest = shortest_side(self.transforms)
        self._rest = transforms.Compose(list(self.transforms[2:]))
        first: Any = self.transforms[0] if self.transforms else None
        # Anything else is bounded already when its first step fixes the output size (squash, longest).
        self._needs_cap = self._shortest is None and not (
            (type(first) is transforms.Resize and isinstance(first.size, Sequence) and len(first.size) == 2)
            or getattr(first, "longest", 0) == 1
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self._shortest is not None:
            size, crop, resample = self._shortest
            return self._rest(centre_crop_resize(image, size, crop, resample))
        if self._needs_cap:
            image = cap_aspect(image, MAX_ASPECT)
        return self.compose(image)


def shortest_side(steps: Sequence[Any]) -> tuple[int, tuple[int, int], int] | None:
    """(size, crop, Pillow resample) when the steps start with Resize(int) then CenterCrop, else None."""
    if len(steps) < 2:
        return None
    resize, crop = steps[0], steps[1]
    if type(resize) is not transforms.Resize or type(crop) is not transforms.CenterCrop or resize.max_size is not None:
        return None
    size = resize.size
    if isinstance(size, Sequence):
        if len(size) != 1:
            return None
        size = size[0]
    crop_height, crop_width = crop.size
    return int(size), (int(crop_height), int(crop_width)), pil_modes_mapping[resize.interpolation]


def centre_crop_resize(image: Image.Image, size: int, crop: tuple[int, int], resample: int) -> Image.Image:
    """torchvision's Resize(size) then CenterCrop(crop), computing only the pixels the crop keeps."""
    width, height = image.size
    # torchvision's output size for Resize(int): the shortest side becomes `size`, the other scales (floored).
    if width <= height:
        resized_width, resized_height = size, int(size * height / width)
    else:
        resized_width, resized_height = int(size * width / height), size
    crop_height, crop_width = crop
    if crop_height > resized_height or crop_width > resized_width:
        # CenterCrop would pad: rare enough (crop larger than the resize) to take the plain path.
        return transforms.CenterCrop(crop)(image.resize((resized_width, resized_height), resample))
    top = int(round((resized_height - crop_height) / 2.0))
    left = int(round((resized_width - crop_width) / 2.0))
    scale_x, scale_y = width / resized_width, height / resized_height
    box = (left * scale_x, top * scale_y, (left + crop_width) * scale_x, (top + crop_height) * scale_y)
    return image.resize((crop_width, crop_height), resample, box=box)


def cap_aspect(image: Image.Image, max_aspect: int) -> Image.Image:
    """The centre of `image`, its longest side cut to at most `max_aspect` times its shortest."""
    width, height = image.size
    if width > max_aspect * height:
        left = (width - max_aspect * height) // 2
        return image.crop((left, 0, left + max_aspect * height, height))
    if height > max_aspect * width:
        top = (height - max_aspect * width) // 2
        return image.crop((0, top, width, top + max_aspect * width))
    return image
