"""Image bytes -> an upright RGB picture, as small as the model's preprocessing allows.

Every supported format ends up as 8-bit RGB the way a person would see it: upright (the orientation
EXIF, XMP, a PNG's eXIf or a WebP's EXIF gives, applied), transparency (alpha or a colour key)
flattened onto white, CMYK, palette, 16-bit and grayscale converted, 32-bit and float samples
scaled by their own range; a multi-page TIFF's largest page, an animation's first frame.

The pixel limit is checked from the header, before any pixel is decoded, and it is the only one:
Pillow's own decompression-bomb guard (about 179 MP) is switched off, or images above it would be
reported as corrupt while those just below our limit are reported as too big.

What bounds an upload's cost is the budget the operating system enforces on the process that
decodes it (sandbox.py). The structure checks here (`too_costly_structure`: a JPEG's scans and
segments, a PNG's chunks, a TIFF's strips and tiles) only refuse, quickly and with a clear message,
the files whose header already says they would cost far more than any photo: they are walked
without Pillow, which parses these structures in Python, holding the GIL, before any pixel.
"""

from __future__ import annotations

import io
import math
import re
import struct
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, PngImagePlugin, UnidentifiedImageError

from clip_shared.events import DocumentError, ErrorCode
from clip_shared.mime import SNIFF_BYTES, is_accepted, sniff_mime

#: Pillow's format names for the MIME types the pipeline accepts (MPO is a camera JPEG).
SUPPORTED_FORMATS = frozenset({"BMP", "GIF", "JPEG", "MPO", "PNG", "TIFF", "WEBP", "PCX"})

#: Scans a JPEG may hold, whatever its frame type. Baseline has 1, a sequential file one per
#: component at most, libjpeg's progressive script 10, mozjpeg's about 20; each scan is another pass
#: over the whole picture's coefficients, so a crafted file of thousands of tiny scans would cost
#: thousands of decodes of a picture the pixel limit lets through.
MAX_JPEG_SCANS = 64
#: Marker segments a JPEG may hold (Pillow keeps each APPn in a Python list): a photo has about 10,
#: and metadata split in 64 KB segments (ICC, extended XMP) reaches a few hundred in a 50 MB file.
MAX_JPEG_SEGMENTS = 4096
#: Chunks a PNG may hold: IDAT split small and an animation's fcTL and fdAT per frame (20,000 frames
#: take 40,000) stay far below; a flood of empty chunks costs Pillow's Python loop seconds a million.
MAX_PNG_CHUNKS = 250_000
#: Strips or tiles a TIFF may list, and how much bigger than its picture one tile may be.
MAX_TIFF_STRIPS = 1_000_000
MAX_TILE_OVERHANG = 2
#: In entropy-coded data a 0xFF byte is followed by 0x00 (stuffing), a restart marker or more fill:
#: anything else is the next segment's marker.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
#: Start-of-frame markers, every kind (SOF0-SOF15 less DHT, JPG and DAC, which share the range).
_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
#: Markers without a length: TEM and the restart markers, which libjpeg passes over between segments.
_BARE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})

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


def decode(data: bytes, url: str, min_side: int, max_pixels: int) -> Image.Image:
    """Decode `data` (the object at `url`) to RGB; see `decoding`."""
    with decoding(data, url, min_side, max_pixels) as image:
        return image


@contextmanager
def decoding(data: bytes, url: str, min_side: int, max_pixels: int) -> Iterator[Image.Image]:
    """Decode `data` (the object at `url`) to RGB.

    `min_side` is the smallest side the preprocessing needs; a JPEG is decoded by libjpeg at
    1/2, 1/4 or 1/8 scale when that still leaves both sides at least twice that large, which
    skips most of the decoding work on big photos and changes nothing the resize would keep.
    Raises DocumentError naming `url` when the bytes are not an image the pipeline embeds.
    """
    refusal = too_costly_structure(data)
    if refusal is not None:
        raise DocumentError(ErrorCode.TOO_COSTLY, f"{url} {refusal}")
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
    yield _load(image, url, min_side)


@dataclass(frozen=True)
class JpegLayout:
    """What a JPEG's first image is made of, from its markers."""

    #: Its start-of-frame marker (0xC0 baseline, 0xC2 progressive, 0xC9 arithmetic...), None if none.
    frame: int | None
    scans: int
    segments: int


def jpeg_layout(data: bytes) -> JpegLayout:
    """The first image's frame type, scans and segments, found the way libjpeg finds markers
    (jdmarker.c's next_marker): bytes that are not 0xFF are skipped, so are fill 0xFF bytes and FF 00
    pairs, and after each scan the entropy-coded data up to the next marker that is not a restart.
    Stops counting at MAX_JPEG_SEGMENTS + 1 segments, so a flood costs no more than that."""
    frame: int | None = None
    scans = segments = 0
    position, end = 2, len(data)
    while segments <= MAX_JPEG_SEGMENTS:
        position = data.find(b"\xff", position)
        if position < 0:
            break
        while position < end and data[position] == 0xFF:
            position += 1
        if position + 2 >= end:
            break
        marker = data[position]
        position += 1
        if marker == 0x00 or marker in _BARE_MARKERS:
            continue
        if marker in (0xD8, 0xD9):  # a second SOI ends libjpeg's reading as an error, EOI the image
            break
        segments += 1
        length = int.from_bytes(data[position : position + 2], "big")
        if length < 2:
            break
        if frame is None and marker in _FRAMES:
            frame = marker
        position += length
        if marker == 0xDA:
            scans += 1
            found = _NEXT_MARKER.search(data, position)
            if found is None:
                break
            position = found.start()
    return JpegLayout(frame, scans, segments)


def too_costly_structure(data: bytes) -> str | None:
    """Why the file's structure alone says decoding it would cost far more than any photo (the end
    of a sentence that starts with the object's name), or None."""
    if data[:2] == b"\xff\xd8":
        layout = jpeg_layout(data)
        if layout.segments > MAX_JPEG_SEGMENTS:
            return f"is a JPEG of over {MAX_JPEG_SEGMENTS} marker segments; photos have a few dozen"
        if layout.scans > MAX_JPEG_SCANS:
            return f"is a JPEG of {layout.scans} scans; photos have at most {MAX_JPEG_SCANS}, and each costs a full decode"
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        if (chunks := png_chunks(data)) > MAX_PNG_CHUNKS:
            return f"is a PNG of over {chunks - 1} chunks; images have at most a few per frame"
    elif data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return tiff_structure(data)
    return None


def png_chunks(data: bytes) -> int:
    """How many chunks a PNG holds, up to IEND; counting stops past MAX_PNG_CHUNKS."""
    chunks, position, end = 0, 8, len(data)
    while position + 8 <= end and chunks <= MAX_PNG_CHUNKS:
        chunks += 1
        if data[position + 4 : position + 8] == b"IEND":
            break
        position += 12 + int.from_bytes(data[position : position + 4], "big")
    return chunks


#: TIFF tags: ImageWidth, ImageLength, SamplesPerPixel, RowsPerStrip, PlanarConfiguration,
#: TileWidth, TileLength, and the four that list one value per strip or tile.
_WIDTH, _LENGTH, _SAMPLES, _ROWS_PER_STRIP, _PLANAR, _TILE_WIDTH, _TILE_LENGTH = 256, 257, 277, 278, 284, 322, 323
_PER_STRIP = frozenset({273, 279, 324, 325})
#: TIFF's unsigned integer types: SHORT, LONG, LONG8 (BigTIFF).
_INTEGER_TYPES = {3: "H", 4: "I", 16: "Q"}


def tiff_structure(data: bytes) -> str | None:
    """What is wrong with the first image of a TIFF (classic or BigTIFF) whose strips or tiles cost
    far more than its pixels: more strips than its rows need, or a tile far bigger than the picture.
    Reads the first directory's entries only, never the values of the lists (Pillow reads those in
    Python: 5 million strips take it 40 s); None when nothing is wrong or the header is unreadable."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    try:
        if big:
            (offset,) = struct.unpack_from(order + "Q", data, 8)
            (count,) = struct.unpack_from(order + "Q", data, offset)
            entry, first, head = 20, offset + 8, order + "HHQ"
        else:
            (offset,) = struct.unpack_from(order + "I", data, 4)
            (count,) = struct.unpack_from(order + "H", data, offset)
            entry, first, head = 12, offset + 2, order + "HHI"
        values: dict[int, int] = {}
        listed = 0
        for index in range(min(count, 65535)):
            start = first + index * entry
            tag, kind, items = struct.unpack_from(head, data, start)
            if tag in _PER_STRIP:
                listed = max(listed, items)
            elif items == 1 and kind in _INTEGER_TYPES:
                # A single value sits at the start of the entry's value field, in its type's size.
                (values[tag],) = struct.unpack_from(order + _INTEGER_TYPES[kind], data, start + struct.calcsize(head))
    except struct.error:
        return None
    width, height = values.get(_WIDTH, 0), values.get(_LENGTH, 0)
    planes = values.get(_SAMPLES, 1) if values.get(_PLANAR, 1) == 2 else 1
    tile_width, tile_length = values.get(_TILE_WIDTH), values.get(_TILE_LENGTH)
    if tile_width and tile_length:
        if tile_width > max(MAX_TILE_OVERHANG * width, 1024) or tile_length > max(MAX_TILE_OVERHANG * height, 1024):
            return f"is a {width}x{height} TIFF of {tile_width}x{tile_length} tiles: each tile costs far more than the picture"
        needed = math.ceil(width / tile_width) * math.ceil(height / tile_length) * planes
    else:
        # libtiff reads a RowsPerStrip over the height as the height: one strip.
        rows = max(1, min(values.get(_ROWS_PER_STRIP) or height, height))
        needed = math.ceil(height / rows) * planes
    if listed > MAX_TIFF_STRIPS or listed > max(needed, 1):
        return f"is a {width}x{height} TIFF that lists {listed} strips or tiles where its size needs {needed}"
    return None


def declared_size(data: bytes, max_pixels: int) -> tuple[int, int] | None:
    """The width and height decoding `data` would give, read from its headers without decoding a
    pixel (a multi-page TIFF: the page decoding picks); None when they cannot be read or the
    structure is refused (decoding then says why)."""
    if too_costly_structure(data) is not None:
        return None
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
