"""open_clip's evaluation transform, at a cost bounded by the model's input, never by the image's shape,
split where the image is decoded (without torch) from where its tensor is made.

open_clip's usual transform resizes the shortest side to the input size, then crops the centre:
pixels.centre_crop_resize computes only the pixels the crop keeps, the same as resize-then-crop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms.functional import pil_modes_mapping

from clip_worker.pixels import Geometry, Pixels, Step

#: For a transform this module does not know step by step, the longest a picture may be relative to
#: its shortest side before the centre it keeps is cut out first. No open_clip model crops wider than
#: 1:1, so this keeps everything such a crop could see, with room for the resampling filter.
MAX_ASPECT = 4


class Preprocess:
    """Callable like open_clip's transform (PIL image -> normalised CHW tensor); `transforms` lists its steps.

    In two parts when its first steps are a resize and crop torchvision does on PIL images (open_clip's
    `shortest` and `squash` modes): `geometry`, which the decoding process applies, leaving the model's
    input as 8-bit pixels, and the rest (mode conversion, ToTensor, Normalize), which `finish` applies
    in the process that embeds: the same steps on the same pixels, so the same tensor.
    """

    def __init__(self, compose: Callable[[Image.Image], torch.Tensor]) -> None:
        self.compose = compose
        self.transforms: Sequence[Any] = list(getattr(compose, "transforms", ()))
        self.geometry = geometry(self.transforms)
        self._rest = transforms.Compose(list(self.transforms[_steps(self.geometry) :]))
        # Anything else is bounded already when its first step fixes the output size (open_clip's `longest`).
        self._needs_cap = self.geometry is None and getattr(self.transforms[0] if self.transforms else None, "longest", 0) != 1

    @property
    def step(self) -> Step:
        """What the decoding process applies to the decoded picture (pixels.model_pixels): the geometry,
        or for a transform not known step by step the whole of it. A helper then imports torch (and
        open_clip) to unpickle it, on its first such call, before that call's budget starts."""
        return self.geometry if self.geometry is not None else self

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.geometry is not None:
            return self._rest(self.geometry(image))
        if self._needs_cap:
            image = cap_aspect(image, MAX_ASPECT)
        return self.compose(image)

    def finish(self, made: Pixels | torch.Tensor) -> torch.Tensor:
        """What `step` made in a decoding process -> the model's input."""
        return self._rest(made.image()) if isinstance(made, Pixels) else made


def geometry(steps: Sequence[Any]) -> Geometry | None:
    """The Geometry of steps that start with Resize(int) then CenterCrop, or with Resize((h, w)); else None."""
    resize: Any = steps[0] if steps else None
    if type(resize) is not transforms.Resize or resize.max_size is not None:
        return None
    resample = pil_modes_mapping[resize.interpolation]
    size = resize.size
    if isinstance(size, Sequence) and len(size) == 2:
        return Geometry(None, (int(size[0]), int(size[1])), resample)
    crop: Any = steps[1] if len(steps) > 1 else None
    if type(crop) is not transforms.CenterCrop:
        return None
    crop_height, crop_width = crop.size
    return Geometry(int(size[0] if isinstance(size, Sequence) else size), (int(crop_height), int(crop_width)), resample)


def _steps(found: Geometry | None) -> int:
    """How many of the transform's steps a Geometry stands for."""
    if found is None:
        return 0
    return 1 if found.size is None else 2


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
