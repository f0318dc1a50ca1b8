"""Recognise an image's real type from its first bytes, never from its name or Content-Type.

What it accepts is what the worker decodes: filetype matches on a few magic bytes ("BM" makes a
BMP, "GIF" a GIF), so for the accepted types the header behind them is checked too, the way
Pillow will read it. Headers are what 262 bytes hold; the rest is the decoder's to judge.
"""

from __future__ import annotations

import filetype
from filetype.types.base import Type

#: What the pipeline embeds. Keys are the MIME types written into manifests and events.
ACCEPTED_MIME_TYPES: frozenset[str] = frozenset(
    {"image/bmp", "image/gif", "image/jpeg", "image/png", "image/tiff", "image/webp", "image/x-pcx"}
)

#: How many leading bytes `sniff_mime` needs; filetype reads at most 261 (the tar header).
SNIFF_BYTES = 262


class Pcx(Type):
    """ZSoft PCX, which filetype does not know: manufacturer 0x0A, a known version, RLE encoding 1."""

    MIME = "image/x-pcx"
    EXTENSION = "pcx"

    def __init__(self) -> None:
        super().__init__(mime=self.MIME, extension=self.EXTENSION)

    def match(self, buf: bytes | bytearray) -> bool:
        # Pillow reads versions 0, 2, 3 and 5 (not 4, "Windows without palette"), 1-bit in 1, 2 or 4
        # planes, and 8-bit in 1 or 3 planes from version 5; the window must not be empty.
        if len(buf) < 68 or buf[0] != 0x0A or buf[1] not in (0, 2, 3, 5) or buf[2] != 1:
            return False
        bits, planes = buf[3], buf[65]
        left, top, right, bottom = (_u16(buf, offset) for offset in (4, 6, 8, 10))
        modes = bits == 1 and planes in (1, 2, 4) or buf[1] == 5 and bits == 8 and planes in (1, 3)
        return modes and right >= left and bottom >= top


filetype.add_type(Pcx())

#: Pillow's BMP header sizes (core, info and its v2-v5 extensions, OS/2 v2) and pixel depths.
_BMP_HEADERS = frozenset({12, 40, 52, 56, 64, 108, 124})
_BMP_BITS = frozenset({1, 4, 8, 16, 24, 32})
#: Compression -> the depths Pillow decodes it at: none, RLE8, RLE4, bit fields (JPEG and PNG in BMP are not read).
_BMP_COMPRESSION = {0: _BMP_BITS, 1: frozenset({8}), 2: frozenset({4}), 3: frozenset({16, 24, 32})}
#: The bit-field layouts (depth, red, green, blue, alpha masks) Pillow has a raw mode for.
_BMP_BIT_FIELDS = frozenset(
    {
        (32, 0xFF0000, 0xFF00, 0xFF, 0x0),
        (32, 0xFF000000, 0xFF0000, 0xFF00, 0x0),
        (32, 0xFF000000, 0xFF00, 0xFF, 0x0),
        (32, 0xFF000000, 0xFF0000, 0xFF00, 0xFF),
        (32, 0xFF, 0xFF00, 0xFF0000, 0xFF000000),
        (32, 0xFF0000, 0xFF00, 0xFF, 0xFF000000),
        (32, 0xFF000000, 0xFF00, 0xFF, 0xFF0000),
        (32, 0x0, 0x0, 0x0, 0x0),
        (24, 0xFF0000, 0xFF00, 0xFF, 0x0),
        (16, 0xF800, 0x7E0, 0x1F, 0x0),
        (16, 0x7C00, 0x3E0, 0x1F, 0x0),
    }
)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _u16(buf: bytes | bytearray, offset: int) -> int:
    return int.from_bytes(buf[offset : offset + 2], "little")


def _u32(buf: bytes | bytearray, offset: int) -> int:
    return int.from_bytes(buf[offset : offset + 4], "little")


def _readable_bmp(head: bytes) -> bool:
    if len(head) < 26:
        return False
    header = _u32(head, 14)
    if header == 12:
        return _u16(head, 18) > 0 and _u16(head, 20) > 0 and _u16(head, 24) in _BMP_BITS
    if header not in _BMP_HEADERS or len(head) < 14 + header:
        return False
    width, height = _u32(head, 18), _u32(head, 22)
    bits, compression, colours = _u16(head, 28), _u32(head, 30), _u32(head, 46)
    if not (0 < width < 2**31 and height != 0 and bits in _BMP_COMPRESSION.get(compression, ())):
        return False
    if bits <= 8:
        return colours <= 65536
    if compression == 3:  # the masks follow a 40-byte header, or are part of a longer one
        alpha = _u32(head, 66) if header >= 56 else 0
        return (bits, _u32(head, 54), _u32(head, 58), _u32(head, 62), alpha) in _BMP_BIT_FIELDS
    return True


def sniff_mime(head: bytes) -> str | None:
    """The MIME type the bytes really are (any type filetype knows), or None when unknown."""
    kind = filetype.guess(head)
    if kind is None:
        return None
    mime = str(kind.mime)
    if mime == "image/apng":
        # An animated PNG is a PNG whose default image is embedded, as a GIF's first frame is;
        # filetype names it apart only when acTL happens to come within the first bytes.
        return "image/png"
    if mime == "image/png" and not head.startswith(_PNG_SIGNATURE):
        return None
    if mime == "image/gif" and head[:6] not in (b"GIF87a", b"GIF89a"):
        return None
    if mime == "image/bmp" and not _readable_bmp(head):
        return None
    return mime


def is_accepted(mime: str | None) -> bool:
    return mime in ACCEPTED_MIME_TYPES
