"""JPEG bytes -> the model's input on the model's device: nvJPEG decoding, then open_clip's resize
and crop on tensors, normalised once per batch.

On a GPU with a hardware JPEG decoder (A100, A30, Hopper, Ada, Blackwell), decoding there frees
the few vCPUs beside it (g4dn.xlarge has 4); without one, torchvision's nvJPEG does the Huffman
stage on the CPU, one image at a time under a lock, so `hardware_jpeg_decoder` tells the worker to
keep Pillow's reduced-scale decoding instead (docs/gpu.md). Anything this path cannot handle
exactly like the CPU path (other formats, CMYK and grayscale JPEGs, truncated files, images over
the pixel limit or of extreme shape, a JPEG nvJPEG refuses, a resize or allocation that fails on
the device) is left to the CPU path (decoder.decode + open_clip's transform), one image at a time.

Every function here also runs on CPU tensors (decode_jpeg on the CPU), which is how CI checks that
both paths produce the same embeddings.
"""

from __future__ import annotations

import ctypes
import functools
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg

from clip_worker import pixels
from clip_worker.model import ClipModel
from clip_worker.pixels import Header

#: Decoded full-size pixels held on the device at once. A batch of 256 phone photos decoded in one
#: go would be 256 x 12 MP x 3 bytes = 9 GB, more than a T4 can spare beside the model; decoding in
#: chunks of at most this many pixels, cropping each chunk down to the model's input before the
#: next, keeps the frames at 192 MB, plus one frame's float32 copy while it is resized.
DEVICE_PIXEL_BUDGET = 64_000_000

#: A result of the device path for one image: the model's input, or the error that leaves the
#: image to the CPU path.
Outcome = torch.Tensor | RuntimeError

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

# nvjpeg.h: nvjpegBackend_t and nvjpegStatus_t.
_NVJPEG_BACKEND_HARDWARE = 3
_NVJPEG_STATUS_SUCCESS = 0


@dataclass(frozen=True)
class Jpeg:
    """A JPEG the device path can decode, with what its header told the CPU about it."""

    #: The file's bytes as a uint8 tensor on the CPU. Not pinned: nvJPEG parses them on the CPU and
    #: copies them into its own buffers, and pinned blocks would round up to powers of two.
    data: torch.Tensor
    pixels: int
    orientation: int

    @classmethod
    def of(cls, data: bytes, header: Header) -> Jpeg:
        return cls(torch.frombuffer(bytearray(data), dtype=torch.uint8), header.pixels, header.orientation)

    @property
    def size(self) -> int:
        return self.data.numel()


def probe(data: bytes, max_pixels: int) -> Jpeg | None:
    """`data` ready for the device decoder, or None when the CPU path must take it (see pixels.header)."""
    found = pixels.header(data, max_pixels)
    return None if found is None else Jpeg.of(data, found)


class HeldBytes:
    """Bytes of JPEGs waiting for the device decoder, across the prepare threads.

    A JPEG's bytes are held until its batch is decoded on the device: the window of work in flight
    is about 1,040 files on CUDA, which would be 50 GB of 50 MB uploads. Past the limit a JPEG is
    not left for the device but decoded on the CPU path at once: a prepare thread must never wait
    for room, which only the main thread, itself waiting for prepared images, would make.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        with self._lock:
            if self.held + size > self.limit:
                return False
            self.held += size
            return True

    def give(self, size: int) -> None:
        with self._lock:
            self.held -= size


@functools.cache
def hardware_jpeg_decoder(device: torch.device) -> bool:
    """Whether nvJPEG has a hardware JPEG decoder on `device` (docs/gpu.md lists the GPUs).

    Asks nvJPEG itself, as torchvision does before choosing its backend: a handle for the hardware
    backend cannot be created (NVJPEG_STATUS_ARCH_MISMATCH) on a GPU without the engine.
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    nvjpeg = _torchvision_nvjpeg()
    if nvjpeg is None:
        return False
    handle = ctypes.c_void_p()
    with torch.cuda.device(device):
        status = nvjpeg.nvjpegCreateEx(_NVJPEG_BACKEND_HARDWARE, None, None, 0, ctypes.byref(handle))
        if status == _NVJPEG_STATUS_SUCCESS:
            nvjpeg.nvjpegDestroy(handle)
    return status == _NVJPEG_STATUS_SUCCESS


def _torchvision_nvjpeg() -> ctypes.CDLL | None:
    """The nvJPEG library torchvision's decoder is linked against (its wheel bundles one under a
    hashed name), found among this process's mapped files; None for a build without nvJPEG."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            path = next((line.split()[-1] for line in maps if "/libnvjpeg" in line), None)
    except OSError:
        return None
    if path is None:
        return None
    nvjpeg = ctypes.CDLL(path)
    nvjpeg.nvjpegCreateEx.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_uint,
        ctypes.POINTER(ctypes.c_void_p),
    ]
    nvjpeg.nvjpegCreateEx.restype = ctypes.c_int
    nvjpeg.nvjpegDestroy.argtypes = [ctypes.c_void_p]
    nvjpeg.nvjpegDestroy.restype = ctypes.c_int
    return nvjpeg


class DecodeStream:
    """The device path's own CUDA stream beside the model's, and the synchronisation between them.

    torchvision's CUDA decode_jpeg allocates its output on the current stream but writes it from a
    stream of its own that does not wait for the current one (pytorch/vision#9606; nvJPEG's
    hardware engine does not even wait for its own stream). On the model's stream, it could be
    handed memory that the queued forward pass has yet to read, and overwrite it. Here, the decoder
    only ever gets memory of this stream, and only once everything queued on it has run; what the
    model's stream reads from it is kept from reuse until the model has read it.

    On the CPU every call is a no-op: there, each operation has finished when it returns.
    """

    def __init__(self, device: torch.device) -> None:
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @contextmanager
    def current(self) -> Iterator[None]:
        """Queue the work of the block on this stream."""
        if self._stream is None:
            yield
            return
        with torch.cuda.stream(self._stream):
            yield

    def idle(self) -> None:
        """Wait, on the host, for everything queued on this stream: call before each decode."""
        if self._stream is not None:
            self._stream.synchronize()

    def hand_over(self, tensor: torch.Tensor) -> None:
        """Make `tensor`, computed on this stream, safe to use on the caller's (the model's) stream."""
        if self._stream is None:
            return
        ready = torch.cuda.Event()
        ready.record(self._stream)
        consumer = torch.cuda.current_stream(self._stream.device)
        consumer.wait_event(ready)
        # Its memory returns to this stream's pool only once the consumer's queued work has run.
        tensor.record_stream(consumer)


def decode(jpegs: Sequence[Jpeg], device: torch.device) -> list[Outcome]:
    """Upright RGB uint8 CHW tensors on `device`, or the error for each JPEG the decoder refused."""
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders for TorchCodec, which the pinned stack lacks.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            images: list[Outcome] = list(decode_jpeg([jpeg.data for jpeg in jpegs], ImageReadMode.RGB, device))
        except RuntimeError:
            # The batched call gives nothing back when one image fails (or the batch does not fit in
            # memory): find it, keep the others.
            images = [_attempt(decode_jpeg, jpeg.data, ImageReadMode.RGB, device) for jpeg in jpegs]
    return [
        _attempt(_UPRIGHT.get(jpeg.orientation, _same), image) if isinstance(image, torch.Tensor) else image
        for jpeg, image in zip(jpegs, images, strict=True)
    ]


def _attempt(step: Callable[..., torch.Tensor], *args: object) -> Outcome:
    # RuntimeError covers what a device throws at one image: nvJPEG's refusals, torch.OutOfMemoryError,
    # and the antialiased resize's "too much shared memory" for very large downscale factors on CUDA.
    try:
        return step(*args)
    except RuntimeError as exc:
        return exc


def _same(image: torch.Tensor) -> torch.Tensor:
    return image


class UnsupportedTransform(ValueError):
    """open_clip's transform for this model has a step with no tensor equivalent here."""


class TensorTransform:
    """open_clip's own evaluation transform, applied to uint8 CHW tensors on `device`.

    It reuses the model's Resize and CenterCrop objects (torchvision applies them to tensors with
    the same output sizes, and its antialiased bicubic uses PIL's kernel), so sizes, crop,
    interpolation, mean and std always come from the model's preprocess config. Normalisation runs
    once per batch with mean and std already on the device: torchvision's Normalize would copy them
    there and check `std == 0` on every call, a wait for the device each time.
    """

    def __init__(self, preprocess: Callable[[Image.Image], torch.Tensor], dtype: torch.dtype, device: torch.device) -> None:
        steps = list(getattr(preprocess, "transforms", ()))
        # open_clip's eval Compose: geometry (Resize / CenterCrop), mode conversion, ToTensor, Normalize.
        geometry = [step for step in steps if isinstance(step, (transforms.Resize, transforms.CenterCrop))]
        normalize = [step for step in steps if isinstance(step, transforms.Normalize)]
        rest = [step for step in steps if step not in geometry and step not in normalize]
        conversions = ("MaybeConvertMode", "MaybeToTensor", "ToTensor")  # PIL -> tensor: decode_jpeg did them
        if not geometry or len(normalize) != 1 or any(type(step).__name__ not in conversions for step in rest):
            raise UnsupportedTransform(f"no tensor equivalent for {preprocess}")
        mean = torch.as_tensor(normalize[0].mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.as_tensor(normalize[0].std, dtype=torch.float32).view(1, -1, 1, 1)
        if (std == 0).any():
            raise UnsupportedTransform(f"Normalize divides by a zero std: {normalize[0]}")
        self._geometry = transforms.Compose(geometry)
        self._mean = mean.to(device)
        self._std = std.to(device)
        self.dtype = dtype
        self.device = device

    @classmethod
    def for_model(cls, model: ClipModel) -> TensorTransform:
        return cls(model.preprocess, model.dtype, model.device)

    def crop(self, image: torch.Tensor) -> torch.Tensor:
        """One uint8 CHW image -> its uint8 resize and centre crop, the size of the model's input."""
        return self._geometry(image)

    def normalise(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """uint8 crops -> the model's input for all of them (NCHW), in its dtype."""
        # The arithmetic of ToTensor and Normalize, in float32, so both paths round alike.
        return torch.stack(list(crops)).float().div_(255).sub_(self._mean).div_(self._std).to(self.dtype)


def preprocess(jpegs: Sequence[Jpeg], transform: TensorTransform, stream: DecodeStream) -> list[Outcome]:
    """Each JPEG as the model's input on the transform's device, ready for the caller's stream, or
    the error that leaves it to the CPU path.

    Decodes in chunks of at most DEVICE_PIXEL_BUDGET pixels, so a batch of big photos never holds
    all its full-size frames at once.
    """
    outcomes: list[Outcome] = []
    with stream.current():
        for chunk in _chunks(jpegs):
            stream.idle()
            outcomes += [
                _attempt(transform.crop, image) if isinstance(image, torch.Tensor) else image
                for image in decode(chunk, transform.device)
            ]
        crops = [outcome for outcome in outcomes if isinstance(outcome, torch.Tensor)]
        if not crops:
            return outcomes
        pixels = _attempt(transform.normalise, crops)
    if isinstance(pixels, RuntimeError):
        return [pixels if isinstance(outcome, torch.Tensor) else outcome for outcome in outcomes]
    stream.hand_over(pixels)
    rows = iter(pixels)
    return [next(rows) if isinstance(outcome, torch.Tensor) else outcome for outcome in outcomes]


def _chunks(jpegs: Sequence[Jpeg]) -> Iterator[Sequence[Jpeg]]:
    start = 0
    while start < len(jpegs):
        end, pixels = start, 0
        while end < len(jpegs) and (end == start or pixels + jpegs[end].pixels <= DEVICE_PIXEL_BUDGET):
            pixels += jpegs[end].pixels
            end += 1
        yield jpegs[start:end]
        start = end
