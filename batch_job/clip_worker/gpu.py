"""JPEG bytes -> the model's input tensor on the accelerator: nvJPEG decoding, then open_clip's resize,
crop and normalisation done on tensors.

On a GPU box the CPU cannot decode JPEGs as fast as the GPU embeds them (g4dn.xlarge has 4 vCPUs
beside its T4), so the worker ships the compressed bytes to the GPU and decodes them there in
batches. Anything this path cannot handle exactly like the CPU path does (other formats, CMYK and
grayscale JPEGs, truncated files, images over the pixel limit, a JPEG nvJPEG refuses) is left to
the CPU path (decoder.decode + open_clip's transform), one image at a time.

Every function here also runs on CPU tensors (decode_jpeg on the CPU), which is how CI checks that
both paths produce the same embeddings.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg

from clip_worker.model import ClipModel

#: Decoded full-size pixels held on the device at once. A batch of 256 phone photos decoded in one
#: go would be 256 x 12 MP x 3 bytes = 9 GB, more than a T4 can spare beside the model; decoding in
#: chunks of at most this many pixels, cropping each chunk down to the model's input before the
#: next, keeps the decode's memory at ~1 GB (uint8 frames plus resize's float32 temporaries).
DEVICE_PIXEL_BUDGET = 64_000_000

_EXIF_ORIENTATION = 0x0112
#: What each EXIF orientation needs to be displayed upright (Pillow's exif_transpose, on CHW tensors).
_UPRIGHT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    2: lambda image: image.flip(-1),
    3: lambda image: image.flip(-2, -1),
    4: lambda image: image.flip(-2),
    5: lambda image: image.transpose(-2, -1),
    6: lambda image: image.rot90(-1, (-2, -1)),
    7: lambda image: image.transpose(-2, -1).flip(-2, -1),
    8: lambda image: image.rot90(1, (-2, -1)),
}


@dataclass(frozen=True)
class Jpeg:
    """A JPEG the device path can decode, with what its header told the CPU about it."""

    #: The file's bytes as a uint8 tensor on the CPU (pinned when headed to CUDA, so the copy is a DMA).
    data: torch.Tensor
    pixels: int
    orientation: int


def probe(data: bytes, max_pixels: int, pin: bool) -> Jpeg | None:
    """`data` ready for the device decoder, or None when the CPU path must take it.

    Reads the header only (Pillow stops before the compressed data), so it costs microseconds.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - whatever it is, the CPU path decides what to report
        return None
    width, height = image.size
    if (
        image.format not in ("JPEG", "MPO")  # MPO: a camera JPEG whose first image is the photo
        # nvJPEG's RGB output is only sure to match Pillow for YCbCr JPEGs; CMYK and gray go to Pillow.
        or image.mode != "RGB"
        # The pixel limit's error message is the CPU path's to give.
        or width * height > max_pixels
        # A file cut short decodes with grey blocks on nvJPEG but fails in Pillow; keep Pillow's verdict.
        or not data.endswith(b"\xff\xd9")
    ):
        return None
    tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return Jpeg(tensor.pin_memory() if pin else tensor, width * height, orientation if orientation in _UPRIGHT else 1)


def decode(jpegs: Sequence[Jpeg], device: torch.device) -> list[torch.Tensor | None]:
    """Upright RGB uint8 CHW tensors on `device`, None for each JPEG the decoder refused."""
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders for TorchCodec, which the pinned stack lacks.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            images: list[torch.Tensor | None] = list(decode_jpeg([jpeg.data for jpeg in jpegs], ImageReadMode.RGB, device))
        except RuntimeError:
            # The batched call gives nothing back when one image fails: find it, keep the others.
            images = []
            for jpeg in jpegs:
                try:
                    images.append(decode_jpeg(jpeg.data, ImageReadMode.RGB, device))
                except RuntimeError:
                    images.append(None)
    return [None if image is None else _UPRIGHT.get(jpeg.orientation, _same)(image) for jpeg, image in zip(jpegs, images)]


def _same(image: torch.Tensor) -> torch.Tensor:
    return image


class UnsupportedTransform(ValueError):
    """open_clip's transform for this model has a step with no tensor equivalent here."""


class TensorTransform:
    """open_clip's own evaluation transform, applied to uint8 CHW tensors on any device.

    It reuses the model's Resize and CenterCrop objects (torchvision applies them to tensors with
    the same output sizes, and its antialiased bicubic uses PIL's kernel), so sizes, crop,
    interpolation, mean and std always come from the model's preprocess config.
    """

    def __init__(self, preprocess: Callable[[Image.Image], torch.Tensor], dtype: torch.dtype) -> None:
        steps = list(getattr(preprocess, "transforms", ()))
        # open_clip's eval Compose: geometry (Resize / CenterCrop), mode conversion, ToTensor, Normalize.
        geometry = [step for step in steps if isinstance(step, (transforms.Resize, transforms.CenterCrop))]
        normalize = [step for step in steps if isinstance(step, transforms.Normalize)]
        rest = [step for step in steps if step not in geometry and step not in normalize]
        conversions = ("MaybeConvertMode", "MaybeToTensor", "ToTensor")  # PIL -> tensor: decode_jpeg did them
        if not geometry or len(normalize) != 1 or any(type(step).__name__ not in conversions for step in rest):
            raise UnsupportedTransform(f"no tensor equivalent for {preprocess}")
        self._geometry = transforms.Compose(geometry)
        self._normalize = normalize[0]
        self._dtype = dtype

    @classmethod
    def for_model(cls, model: ClipModel) -> "TensorTransform":
        return cls(model.preprocess, model.dtype)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """One uint8 CHW image -> the normalised model input, in the model's dtype."""
        cropped = self._geometry(image)
        # Scaling and normalising in float32 on the small crop costs nothing and rounds like ToTensor.
        return self._normalize(cropped.float().div_(255)).to(self._dtype)


def preprocess(jpegs: Sequence[Jpeg], transform: TensorTransform, device: torch.device) -> list[torch.Tensor | None]:
    """Each JPEG as the model's input on `device`, None where the decoder refused it.

    Decodes in chunks of at most DEVICE_PIXEL_BUDGET pixels, so a batch of big photos never holds
    all its full-size frames at once.
    """
    results: list[torch.Tensor | None] = []
    start = 0
    while start < len(jpegs):
        end, pixels = start, 0
        while end < len(jpegs) and (end == start or pixels + jpegs[end].pixels <= DEVICE_PIXEL_BUDGET):
            pixels += jpegs[end].pixels
            end += 1
        results += [None if image is None else transform(image) for image in decode(jpegs[start:end], device)]
        start = end
    return results
