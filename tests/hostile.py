"""Uploads of accepted types that are cheap in bytes and costly to decode, generated here, small.

Each is one of a class of files that bypassed a check on the header: the decoding sandbox (or a
fast structure check) must fail them alone with `too-costly`. `expensive` ones pass every structure
check and cost seconds of CPU or hundreds of MB, so only the operating system's budget stops them.
"""

from __future__ import annotations

import struct
import zlib

from PIL import Image

from tests.support import encode, photo


def _picture() -> Image.Image:
    return photo().resize((96, 64))


def _after_app0(jpeg: bytes) -> int:
    return 4 + int.from_bytes(jpeg[4:6], "big")


def scan_bomb(repeats: int = 200, stray: bytes = b"\x00") -> bytes:
    """A progressive JPEG whose last scan is repeated, with `stray` bytes after APP0 that libjpeg
    skips and a walker that stops at the first byte that is not 0xFF would not."""
    progressive = encode(_picture(), "JPEG", progressive=True)
    last = progressive.rfind(b"\xff\xda")
    bomb = progressive[:last] + progressive[last:-2] * repeats + b"\xff\xd9"
    cut = _after_app0(bomb)
    return bomb[:cut] + stray + bomb[cut:]


def sequential_scan_bomb(frame: int = 0xC9, repeats: int = 200) -> bytes:
    """A sequential JPEG (`frame`: 0xC0 baseline, 0xC9 arithmetic) whose one scan is repeated."""
    baseline = bytearray(encode(_picture(), "JPEG"))
    sof = baseline.find(b"\xff\xc0")
    baseline[sof + 1] = frame
    scan = bytes(baseline).rfind(b"\xff\xda")
    return bytes(baseline[:scan]) + bytes(baseline[scan:-2]) * repeats + b"\xff\xd9"


def app_flood(segments: int = 5_000) -> bytes:
    """A JPEG of thousands of empty APP1 segments before its picture (Pillow lists each in Python)."""
    jpeg = encode(_picture(), "JPEG")
    cut = _after_app0(jpeg)
    return jpeg[:cut] + b"\xff\xe1\x00\x02" * segments + jpeg[cut:]


def _tiff(width: int, height: int, tags: list[tuple[int, int, int, int]], body: bytes = b"") -> bytes:
    """A little-endian TIFF: header, `body` (at offset 8), then one directory of `tags`
    (tag, type, count, value) sorted by tag, with the value inline."""
    entries = sorted([(256, 4, 1, width), (257, 4, 1, height), *tags])
    directory = 8 + len(body)
    data = b"II*\x00" + struct.pack("<I", directory) + body
    data += struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        data += struct.pack("<HHII", tag, kind, count, value)
    return data + b"\x00\x00\x00\x00"


def huge_tiles(width: int = 64, height: int = 64, tile: int = 46_000) -> bytes:
    """A tiny deflate TIFF whose one tile is declared `tile` x `tile`: libtiff allocates the whole tile."""
    data = zlib.compress(b"\x00" * 64)
    tags = [
        (258, 3, 1, 8),  # BitsPerSample
        (259, 3, 1, 8),  # Compression: deflate
        (262, 3, 1, 1),  # Photometric: min-is-black
        (277, 3, 1, 1),  # SamplesPerPixel
        (322, 4, 1, tile),  # TileWidth
        (323, 4, 1, tile),  # TileLength
        (324, 4, 1, 8),  # TileOffsets
        (325, 4, 1, len(data)),  # TileByteCounts
    ]
    return _tiff(width, height, tags, data)


def many_strips(strips: int, rows_per_strip: int = 1, declared_height: int | None = None) -> bytes:
    """A 1-pixel-wide uncompressed TIFF listing `strips` strips (offsets and byte counts), each one
    byte; `declared_height` other than `strips` makes the list longer than the rows need."""
    height = declared_height or strips * rows_per_strip
    offsets_at = 8
    counts_at = offsets_at + 4 * strips
    pixels_at = counts_at + 4 * strips
    body = struct.pack(f"<{strips}I", *(pixels_at + index for index in range(strips)))
    body += struct.pack(f"<{strips}I", *([1] * strips)) + b"\x80" * strips
    tags = [
        (258, 3, 1, 8),
        (259, 3, 1, 1),  # no compression
        (262, 3, 1, 1),
        (273, 4, strips, offsets_at),
        (277, 3, 1, 1),
        (278, 4, 1, rows_per_strip),
        (279, 4, strips, counts_at),
    ]
    return _tiff(1, height, tags, body)


def rle_end_of_lines(side: int = 6_000) -> bytes:
    """An RLE8 BMP of `side` x `side` pixels, each row one pixel and an end-of-line code: Pillow's
    decoder (Python) fills the rest of each row one byte at a time."""
    pixels = b"\x01\x00\x00\x00" * side + b"\x00\x01"
    palette = b"\x00\x00\x00\x00" * 256
    header_size = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, side, side, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", header_size + len(pixels), 0, 0, header_size) + info + palette + pixels


def png_chunk_flood(chunks: int = 300_000) -> bytes:
    """A PNG with `chunks` empty private chunks between its header and its picture."""
    png = encode(Image.new("RGB", (8, 8)), "PNG")
    empty = struct.pack(">I", 0) + b"prIv" + struct.pack(">I", zlib.crc32(b"prIv"))
    return png[:33] + empty * chunks + png[33:]


def flat_rgba_png(side: int = 4_000) -> bytes:
    """A valid, transparent `side` x `side` PNG of a few KB per megapixel: decoding and flattening
    it onto white takes about 16 bytes a pixel, whatever its size in bytes."""
    return encode(Image.new("RGBA", (side, side)), "PNG")
