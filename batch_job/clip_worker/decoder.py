"""Image bytes -> an upright RGB picture, as small as the model's preprocessing allows.

Every supported format ends up as 8-bit RGB the way a person would see it: upright (the orientation
EXIF, XMP, a PNG's eXIf or a WebP's EXIF gives, applied), transparency (alpha or a colour key)
flattened onto white, CMYK, palette, 16-bit and grayscale converted, 32-bit and float samples
scaled by their own range; a multi-page TIFF's largest page, an animation's first frame.

The pixel limit is checked from the header, before any pixel is decoded, and it is the only one:
Pillow's own decompression-bomb guard (about 179 MP) is switched off, or images above it would be
reported as corrupt while those just below our limit are reported as too big.
"""

from __future__ import annotations

import io
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, PngImagePlugin, UnidentifiedImageError

from clip_shared.events import DocumentError, ErrorCode
from clip_shared.mime import SNIFF_BYTES, is_accepted, sniff_mime

#: Pillow's format names for the MIME types the pipeline accepts (MPO is a camera JPEG).
SUPPORTED_FORMATS = frozenset({"BMP", "GIF", "JPEG", "MPO", "PNG", "TIFF", "WEBP", "PCX"})

#: Scans a JPEG may hold. Baseline has 1, libjpeg's progressive script 10, mozjpeg's about 20; each
#: scan is another pass over the whole picture's coefficients, so a crafted file of thousands of tiny
#: scans would cost thousands of decodes of a picture the pixel limit lets through.
MAX_JPEG_SCANS = 64
#: In entropy-coded data a 0xFF byte is followed by 0x00 (stuffing), a restart marker or more fill:
#: anything else is the next segment's marker.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
#: Start-of-frame markers of sequential JPEGs (baseline, extended, lossless; Huffman or arithmetic).
_SEQUENTIAL_FRAMES = frozenset({0xC0, 0xC1, 0xC3, 0xC5, 0xC7, 0xC9, 0xCB, 0xCD, 0xCF})

#: Pages of a TIFF looked at for its largest (a scan's thumbnail page, a pyramid's levels come first
#: or within a few); each costs reading its directory, so a file of thousands of pages costs no more.
MAX_TIFF_PAGES = 32

_SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
#: 32-bit integer and float samples: no fixed range (a depth map, a scientific capture, HDR).
_WIDE = frozenset({"I", "F"})
_WITH_ALPHA = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})
_BIT_DEPTH = re.compile(r"(\d+)-bit")

#: PNG text chunks (by keyword) that can say how to turn the picture: XMP, and the EXIF that
#: ImageMagick stores as text. Pillow reads the orientation from both.
_PNG_ORIENTATION_TEXT = frozenset({b"XML:com.adobe.xmp", b"Raw profile type exif"})
#: A PNG keyword is 1-79 bytes, then a NUL.
_PNG_KEYWORD_BYTES = 80

Image.MAX_IMAGE_PIXELS = None
# The text Pillow still reads (above) may inflate to 16 MB a chunk, 64 MB an image (its limits are
# 1 MB and 64 MB): Photoshop's XMP history runs to megabytes.
PngImagePlugin.MAX_TEXT_CHUNK = 16 * 1024 * 1024
PngImagePlugin.MAX_TEXT_MEMORY = 64 * 1024 * 1024


class _PngStream(PngImagePlugin.PngStream):
    """Pillow's PNG chunk reader, without the metadata the pipeline has no use for: ICC profiles and
    text chunks are skipped, not inflated. A PNG may carry megabytes of them, and Pillow calls an image
    whose metadata inflates past its limits broken. Orientation text is still read, and skipped in
    turn when it is past the limits: the picture is then embedded as stored rather than not at all."""

    def _skip(self, pos: int, length: int) -> bytes:
        assert self.fp is not None
        return ImageFile._safe_read(self.fp, length)

    def _text(self, read: Callable[[int, int], bytes], pos: int, length: int) -> bytes:
        assert self.fp is not None
        start = self.fp.tell()
        keyword = self.fp.read(min(length, _PNG_KEYWORD_BYTES)).split(b"\0", 1)[0]
        self.fp.seek(start)
        if keyword in _PNG_ORIENTATION_TEXT:
            try:
                return read(pos, length)
            except ValueError:  # past MAX_TEXT_CHUNK or MAX_TEXT_MEMORY
                self.fp.seek(start)
        return self._skip(pos, length)

    def chunk_iCCP(self, pos: int, length: int) -> bytes:
        return self._skip(pos, length)

    def chunk_tEXt(self, pos: int, length: int) -> bytes:
        return self._text(super().chunk_tEXt, pos, length)

    def chunk_zTXt(self, pos: int, length: int) -> bytes:
        return self._text(super().chunk_zTXt, pos, length)

    def chunk_iTXt(self, pos: int, length: int) -> bytes:
        return self._text(super().chunk_iTXt, pos, length)


# PngImageFile makes its chunk reader from this module attribute, for every PNG and APNG opened.
PngImagePlugin.PngStream = _PngStream  # type: ignore[misc]  # a subclass in Pillow's own slot, on purpose


class PixelBudget:
    """How many pixels may be decoding at once across threads; one image over it decodes alone.

    Decoding holds the whole frame (up to 8 bytes a pixel for 16-bit RGBA, plus conversion copies),
    so sixteen threads each on an image at the pixel limit would need more memory than the
    instance has, while a limit per image alone bounds nothing across threads.
    """

    def __init__(self, pixels: int) -> None:
        self.pixels = pixels
        self._used = 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: self._used == 0 or self._used + pixels <= self.pixels)
            self._used += pixels
        try:
            yield
        finally:
            with self._changed:
                self._used -= pixels
                self._changed.notify_all()


def decode(data: bytes, url: str, min_side: int, max_pixels: int) -> Image.Image:
    """Decode `data` (the object at `url`) to RGB; see `decoding`."""
    with decoding(data, url, min_side, max_pixels) as image:
        return image


@contextmanager
def decoding(data: bytes, url: str, min_side: int, max_pixels: int, budget: PixelBudget | None = None) -> Iterator[Image.Image]:
    """Decode `data` (the object at `url`) to RGB, holding `budget` until the caller is done with it.

    `min_side` is the smallest side the preprocessing needs; a JPEG is decoded by libjpeg at
    1/2, 1/4 or 1/8 scale when that still leaves both sides at least twice that large, which
    skips most of the decoding work on big photos and changes nothing the resize would keep.
    Raises DocumentError naming `url` when the bytes are not an image the pipeline embeds.
    """
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below decides; Pillow's warning about it would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        if image.format not in SUPPORTED_FORMATS:
            raise DocumentError(ErrorCode.UNSUPPORTED_TYPE, f"{url} is a {image.format} image, which the pipeline does not embed")
        if image.format == "TIFF":
            _seek_largest_page(image, max_pixels)
        width, height = image.size
        if image.format in ("JPEG", "MPO") and (scans := jpeg_scans(data)) > MAX_JPEG_SCANS:
            raise DocumentError(
                ErrorCode.CORRUPT_IMAGE,
                f"{url} is a JPEG of {scans} scans; photos have at most {MAX_JPEG_SCANS}, and each costs a full decode",
            )
        if width * height > max_pixels:
            raise DocumentError(
                ErrorCode.TOO_MANY_PIXELS,
                f"{url} is {width}x{height} = {width * height} pixels, over the {max_pixels}-pixel limit (MAX_IMAGE_PIXELS)",
            )
    except DocumentError:
        raise
    except UnidentifiedImageError as exc:
        sniffed = sniff_mime(data[:SNIFF_BYTES])
        if sniffed == "image/jpeg" and (depth := _jpeg_depth(data)):
            raise DocumentError(
                ErrorCode.UNSUPPORTED_TYPE, f"{url} is a {depth}-bit JPEG; the pipeline embeds 8-bit JPEGs"
            ) from exc
        if is_accepted(sniffed):
            raise DocumentError(ErrorCode.CORRUPT_IMAGE, f"{url} starts like {sniffed} but is not a readable image") from exc
        kind = f"a {sniffed} file" if sniffed else "not a recognisable file type"
        raise DocumentError(ErrorCode.UNSUPPORTED_TYPE, f"{url} is {kind}, not an image the pipeline embeds") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DocumentError(ErrorCode.CORRUPT_IMAGE, f"{url} could not be decoded: {exc}") from exc
    with budget.hold(width * height) if budget else nullcontext():
        yield _load(image, url, min_side)


def jpeg_scans(data: bytes) -> int:
    """How many scans (SOS segments) a progressive JPEG's first image holds, walking its markers, not
    its pixels; 1 for a sequential JPEG, whose few scans (one per component at most) cost one decode."""
    scans, position, end = 0, 2, len(data)
    while position + 4 <= end:
        marker = data[position + 1]
        if data[position] != 0xFF or marker == 0xD9:
            break
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD7:
            position += 1 if marker == 0xFF else 2
            continue
        if marker in _SEQUENTIAL_FRAMES:
            return 1
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == 0xDA:
            scans += 1
            found = _NEXT_MARKER.search(data, position)
            if found is None:
                break
            position = found.start()
    return scans


def declared_size(data: bytes, max_pixels: int) -> tuple[int, int] | None:
    """The width and height decoding `data` would give, read from its headers without decoding a
    pixel (a multi-page TIFF: the page decoding picks); None when they cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.format == "TIFF":
                    _seek_largest_page(image, max_pixels)
                return image.size
    except Exception:  # noqa: BLE001 - whatever a malformed header raises, decoding reports it
        return None


def _jpeg_depth(data: bytes) -> int | None:
    """The sample precision of a JPEG Pillow refused for it (12-bit, or 16-bit lossless), else None."""
    try:
        JpegImagePlugin.JpegImageFile(io.BytesIO(data))
    except SyntaxError as exc:
        found = _BIT_DEPTH.search(str(exc))
        return int(found[1]) if found else None
    except Exception:  # noqa: BLE001 - any other refusal is not about the depth: the caller calls it corrupt
        return None
    return None


def _seek_largest_page(image: Image.Image, max_pixels: int) -> None:
    """Leave a multi-page TIFF on its largest page within the pixel limit (the first when none is):
    a scanner or Photoshop may store a thumbnail first, a pyramid its levels in any order."""
    best, best_pixels = 0, -1
    for page in range(MAX_TIFF_PAGES):
        try:
            image.seek(page)
        except Exception:  # noqa: BLE001 - past the last page, or a page Pillow cannot read: no candidate
            break
        pixels = image.width * image.height
        if best_pixels < pixels <= max_pixels:
            best, best_pixels = page, pixels
    image.seek(best)


def _load(image: Image.Image, url: str, min_side: int) -> Image.Image:
    try:
        # A lossless JPEG (no quantisation tables) cannot be decoded at reduced scale by libjpeg.
        if image.format in ("JPEG", "MPO") and getattr(image, "quantization", None):
            # Twice the target keeps the final resize a real antialiasing downscale: at 1x, libjpeg's
            # block averaging alone sets the pixels and 2 MP photos drift to cosine ~0.9995.
            image.draft("RGB", (2 * min_side, 2 * min_side))
        image = ImageOps.exif_transpose(image)
        image.load()
        return to_rgb(image)
    except (OSError, SyntaxError, ValueError) as exc:
        raise DocumentError(ErrorCode.CORRUPT_IMAGE, f"{url} could not be decoded: {exc}") from exc


def to_rgb(image: Image.Image) -> Image.Image:
    key = _colour_key_alpha(image)
    if image.mode in _SIXTEEN_BIT:
        # Pillow's convert("L") clips 16-bit samples at 255, which turns most photos white.
        image = image.convert("I").point(lambda value: value * (1 / 256)).convert("L")
    elif image.mode in _WIDE:
        image = _stretched(image)
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _WITH_ALPHA:
        return _on_white(image.convert("RGBA"))
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    if key is None:
        return rgb
    rgb.putalpha(key)
    return _on_white(rgb)


def _colour_key_alpha(image: Image.Image) -> Image.Image | None:
    """The mask a PNG's colour key (tRNS in a grayscale or RGB image: one value that means
    "transparent") makes, or None; a palette's transparency is the palette's own business."""
    key = image.info.get("transparency")
    if image.mode in ("P", *_WITH_ALPHA) or not isinstance(key, (int, tuple)):
        return None
    pixels = np.asarray(image)
    keyed = (pixels == np.asarray(key)).all(axis=-1) if pixels.ndim == 3 else pixels == key
    return Image.fromarray(np.where(keyed, 0, 255).astype(np.uint8), "L") if keyed.any() else None


def _stretched(image: Image.Image) -> Image.Image:
    """32-bit or float samples to 8 bits by their own finite range (floats already within 0-1 keep
    that range, the usual convention); Pillow would clip them to 0-255, all black or all white."""
    pixels = np.array(image, dtype=np.float32)
    pixels[~np.isfinite(pixels)] = np.nan
    if np.isnan(pixels).all():
        return Image.new("L", image.size, 0)
    low, high = float(np.nanmin(pixels)), float(np.nanmax(pixels))
    if image.mode == "F" and 0 <= low and high <= 1:
        low, high = 0.0, 1.0
    pixels -= low
    pixels *= 255 / (high - low) if high > low else 0
    np.nan_to_num(pixels, copy=False, nan=0)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "L")


def _on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
