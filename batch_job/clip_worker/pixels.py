"""What the sandbox's decoding processes run (sandbox.py): image bytes -> the pixels of the model's
input, with Pillow alone.

Nothing here imports torch. A helper that imports only this module starts in a fraction of a
second and holds tens of MB where torch and open_clip took hundreds, and what it sends back is the
model's input as 8-bit pixels (`Pixels`, 150 KB at 224x224) instead of the float32 tensor (600
KB). The caller turns them into the tensor with the rest of the model's own transform
(transform.Preprocess.finish: ToTensor, Normalize), so the result is the same to the bit.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from clip_shared.events import DocumentError, ErrorCode
from clip_worker import decoder

if TYPE_CHECKING:
    from torch import Tensor  # for the annotations only: a helper never imports torch for a Geometry

#: The longest side a JPEG may have, relative to its shortest, to be resized on the device. open_clip
#: resizes the shortest side to the model's input before cropping the centre, so the intermediate
#: grows with the aspect ratio (a 65000x8 JPEG would become 1,820,000x224); past this ratio the CPU
#: path, which resamples only the region its crop keeps, takes the image. Real panoramas stay here.
MAX_DEVICE_ASPECT = 16

#: Frames nvJPEG decodes: Huffman-coded baseline, extended and progressive. Arithmetic-coded and
#: lossless JPEGs go to Pillow.
_DEVICE_FRAMES = frozenset({0xC0, 0xC1, 0xC2})
_EXIF_ORIENTATION = 0x0112
#: EXIF's orientations other than upright (device_decode turns each on the device).
_TURNED = range(2, 9)


@dataclass(frozen=True)
class Geometry:
    """The resize and crop that start a model's transform, as plain numbers: it pickles to a few
    bytes and applies to a PIL image without torch.

    `size` set: torchvision's Resize(size) (the shortest side) then CenterCrop(crop); None: Resize(crop),
    both sides at once (open_clip's `squash`). `crop` is (height, width), `resample` Pillow's filter.
    """

    size: int | None
    crop: tuple[int, int]
    resample: int

    def __call__(self, image: Image.Image) -> Image.Image:
        height, width = self.crop
        if self.size is None:
            return image.resize((width, height), self.resample)
        return centre_crop_resize(image, self.size, self.crop, self.resample)


@dataclass(frozen=True)
class Pixels:
    """A picture the size of the model's input, as bytes: what a decoding process sends back."""

    mode: str
    size: tuple[int, int]
    data: bytes

    @classmethod
    def of(cls, image: Image.Image) -> Pixels:
        return cls(image.mode, image.size, image.tobytes())

    def image(self) -> Image.Image:
        return Image.frombytes(self.mode, self.size, self.data)


#: What a decoding process applies to the decoded picture: a Geometry (-> Pixels), or a whole
#: transform.Preprocess for a transform it does not know step by step (-> the model's input tensor).
Step = Callable[[Image.Image], Any]


def centre_crop_resize(image: Image.Image, size: int, crop: tuple[int, int], resample: int) -> Image.Image:
    """torchvision's Resize(size) then CenterCrop(crop), computing only the pixels the crop keeps.

    open_clip's usual transform resizes the shortest side, then crops the centre: an 85-byte
    40000x1 PNG would become an 8,960,000x224 intermediate (9.7 GB, 19 s) before the crop throws
    nearly all of it away. Pillow resamples just the region the crop keeps (`resize`'s `box`), with
    the same filter taps over the same source pixels, at the cost of one input-sized image: the same
    picture, but that the filter's centres may round apart in the last bits, which moves a few pixels
    by one level (tests/worker/test_transform.py).
    """
    width, height = image.size
    # torchvision's output size for Resize(int): the shortest side becomes `size`, the other scales (floored).
    if width <= height:
        resized_width, resized_height = size, int(size * height / width)
    else:
        resized_width, resized_height = int(size * width / height), size
    crop_height, crop_width = crop
    top, left = _crop_start(resized_height, crop_height), _crop_start(resized_width, crop_width)
    if crop_height > resized_height or crop_width > resized_width:
        # CenterCrop pads with black, then crops; Pillow's crop fills what lies outside the picture
        # with black too. Rare enough (a crop larger than the resize) to resize the whole picture.
        return image.resize((resized_width, resized_height), resample).crop((left, top, left + crop_width, top + crop_height))
    scale_x, scale_y = width / resized_width, height / resized_height
    box = (left * scale_x, top * scale_y, (left + crop_width) * scale_x, (top + crop_height) * scale_y)
    return image.resize((crop_width, crop_height), resample, box=box)


def _crop_start(resized: int, crop: int) -> int:
    """Where torchvision's CenterCrop starts along one side: before the picture (negative) by the
    smaller half of the padding when the crop is longer."""
    if crop > resized:
        return -((crop - resized) // 2)
    return int(round((resized - crop) / 2.0))


def model_pixels(data: bytes, url: str, step: Step, min_side: int, max_pixels: int) -> Pixels | Tensor:
    """Image bytes -> `step` of the decoded picture: Pixels for a Geometry, a tensor for a whole
    transform. The one CPU path from bytes to a model's input (transform.Preprocess.finish ends it),
    for the worker and the query API."""
    with decoder.decoding(data, url, min_side, max_pixels) as image:
        made = step(image)
    return Pixels.of(made) if isinstance(made, Image.Image) else made


def model_pixels_each(
    images: Sequence[tuple[str, bytes]], step: Step, min_side: int, max_pixels: int
) -> list[Pixels | Tensor | DocumentError]:
    """`model_pixels` of each (url, bytes), or the DocumentError that says why it cannot be
    embedded: a request's images in one call to a sandbox helper, under one budget."""
    found: list[Pixels | Tensor | DocumentError] = []
    for url, data in images:
        try:
            found.append(model_pixels(data, url, step, min_side, max_pixels))
        except DocumentError as error:
            found.append(error)
        except MemoryError:
            raise  # the sandbox's memory budget: the whole call is too costly
        except Exception as exc:  # noqa: BLE001 - a decoder's surprise on hostile bytes is still a bad image
            found.append(DocumentError(ErrorCode.CORRUPT_IMAGE, f"{url} could not be decoded: {type(exc).__name__}: {exc}"))
    return found


def declared_sizes(images: Sequence[bytes], max_pixels: int) -> list[tuple[int, int] | None]:
    """Each image's size from its header (decoder.declared_size, a multi-page TIFF's page decoding
    picks): a request's look before any decoding, in one call to a sandbox helper."""
    return [decoder.declared_size(data, max_pixels) for data in images]


@dataclass(frozen=True)
class Header:
    """What a JPEG's header tells the device path: its pixels, and which way up it is shown."""

    pixels: int
    orientation: int


def header(data: bytes, max_pixels: int) -> Header | None:
    """What the device path (device_decode) needs of `data`, or None when the CPU path must take it.

    The bytes say it is a JPEG of a frame type nvJPEG decodes before Pillow looks at them: Pillow's
    getexif decodes a whole PNG to find its EXIF chunk. Then Pillow reads the header only.
    """
    if data[:3] != b"\xff\xd8\xff" or not data.endswith(b"\xff\xd9"):
        # A file cut short decodes with grey blocks on nvJPEG but fails in Pillow; keep Pillow's verdict.
        return None
    layout = decoder.jpeg_layout(data)
    if (
        layout.frame not in _DEVICE_FRAMES
        # A decoding bomb of many scans or segments gets the CPU path's refusal.
        or layout.scans > decoder.MAX_JPEG_SCANS
        or layout.segments > decoder.MAX_JPEG_SEGMENTS
    ):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        if image.format not in ("JPEG", "MPO"):  # MPO: a camera JPEG whose first image is the photo
            return None
        orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - whatever it is, the CPU path decides what to report
        return None
    width, height = image.size
    if (
        # nvJPEG's RGB output is only sure to match Pillow for YCbCr JPEGs; CMYK and gray go to Pillow.
        image.mode != "RGB"
        # The pixel limit's error message is the CPU path's to give.
        or width * height > max_pixels
        or max(width, height) > MAX_DEVICE_ASPECT * min(width, height)
    ):
        return None
    return Header(width * height, orientation if orientation in _TURNED else 1)


def device_or_cpu_pixels(data: bytes, url: str, step: Step, min_side: int, max_pixels: int) -> Header | Pixels | Tensor:
    """The header of a JPEG the device path takes, or else `model_pixels`, in one trip to a helper."""
    return header(data, max_pixels) or model_pixels(data, url, step, min_side, max_pixels)
