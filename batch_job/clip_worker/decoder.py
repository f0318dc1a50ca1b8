"""Image bytes -> an upright RGB picture, as small as the model's preprocessing allows.

Every supported format ends up as 8-bit RGB the way a person would see it: EXIF orientation
applied, transparency flattened onto white, CMYK, palette, 16-bit and grayscale converted.

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

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

_SIXTEEN_BIT = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_WITH_ALPHA = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})

Image.MAX_IMAGE_PIXELS = None


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
        if is_accepted(sniffed):
            raise DocumentError(ErrorCode.CORRUPT_IMAGE, f"{url} starts like {sniffed} but is not a readable image") from exc
        kind = f"a {sniffed} file" if sniffed else "not a recognisable file type"
        raise DocumentError(ErrorCode.UNSUPPORTED_TYPE, f"{url} is {kind}, not an image the pipeline embeds") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DocumentError(ErrorCode.CORRUPT_IMAGE, f"{url} could not be decoded: {exc}") from exc
    yield _load(image, url, min_side)


def declared_size(data: bytes) -> tuple[int, int] | None:
    """The width and height an image's header declares, read without decoding a pixel; None when
    the header cannot be read or its structure is refused (decoding then says why)."""
    if too_costly_structure(data) is not None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except Exception:  # noqa: BLE001 - whatever a malformed header raises, decoding reports it
        return None


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


def _load(image: Image.Image, url: str, min_side: int) -> Image.Image:
    try:
        if image.format in ("JPEG", "MPO"):
            # Twice the target keeps the final resize a real antialiasing downscale: at 1x, libjpeg's
            # block averaging alone sets the pixels and 2 MP photos drift to cosine ~0.9995.
            image.draft("RGB", (2 * min_side, 2 * min_side))
        image = ImageOps.exif_transpose(image)
        image.load()
        return to_rgb(image)
    except (OSError, SyntaxError, ValueError) as exc:
        raise DocumentError(ErrorCode.CORRUPT_IMAGE, f"{url} could not be decoded: {exc}") from exc


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT:
        # Pillow's convert("L") clips 16-bit samples at 255, which turns most photos white.
        image = image.convert("I").point(lambda value: value * (1 / 256)).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _WITH_ALPHA:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")
