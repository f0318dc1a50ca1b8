"""Recognise an image's real type from its first bytes, never from its name or Content-Type."""

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
        # Bits per pixel is 1, 2, 4 or 8; checking it keeps stray text files that start with a newline out.
        return len(buf) >= 4 and buf[0] == 0x0A and buf[1] in (0, 2, 3, 4, 5) and buf[2] == 1 and buf[3] in (1, 2, 4, 8)


filetype.add_type(Pcx())


def sniff_mime(head: bytes) -> str | None:
    """The MIME type the bytes really are (any type filetype knows), or None when unknown."""
    kind = filetype.guess(head)
    return kind.mime if kind else None


def is_accepted(mime: str | None) -> bool:
    return mime in ACCEPTED_MIME_TYPES
