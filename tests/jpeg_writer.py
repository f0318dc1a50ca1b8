"""JPEGs Pillow cannot write, written byte by byte from the spec (ITU T.81): lossless (SOF3) and
12-bit sequential (SOF1). libjpeg-turbo decodes both; Debian's cjpeg (2.1) writes neither."""

from __future__ import annotations

import numpy as np
from PIL import Image

#: One Huffman table for every category 0-16, each a 5-bit code (none of them all ones).
_CATEGORIES = bytes(range(17))
_CODE_LENGTH = 5


class _Bits:
    def __init__(self) -> None:
        self.out = bytearray()
        self.value = 0
        self.count = 0

    def put(self, value: int, length: int) -> None:
        self.value = (self.value << length) | (value & ((1 << length) - 1))
        self.count += length
        while self.count >= 8:
            self.count -= 8
            byte = (self.value >> self.count) & 0xFF
            self.out += b"\xff\x00" if byte == 0xFF else bytes([byte])  # byte stuffing
        self.value &= (1 << self.count) - 1

    def flush(self) -> bytes:
        if self.count:
            self.put(0x7F, 8 - self.count)  # pad with ones
        return bytes(self.out)


def _segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body


def _huffman_table(table_class: int, symbols: bytes) -> bytes:
    counts = bytearray(16)
    counts[_CODE_LENGTH - 1] = len(symbols)
    return _segment(0xC4, bytes([table_class << 4]) + bytes(counts) + symbols)


def _put_difference(bits: _Bits, difference: int) -> None:
    category = abs(difference).bit_length()
    bits.put(category, _CODE_LENGTH)  # the canonical code of symbol n is n
    if 0 < category < 16:
        bits.put(difference if difference >= 0 else difference - 1, category)


def _frame(marker: int, precision: int, width: int, height: int, components: int) -> bytes:
    spec = b"".join(bytes([index + 1, 0x11, 0]) for index in range(components))
    return _segment(
        marker, bytes([precision]) + height.to_bytes(2, "big") + width.to_bytes(2, "big") + bytes([components]) + spec
    )


def _scan(components: int, start: int, end: int) -> bytes:
    """Start and end are the spectral selection (DCT) or the predictor and 0 (lossless)."""
    spec = b"".join(bytes([index + 1, 0x00]) for index in range(components))
    return _segment(0xDA, bytes([components]) + spec + bytes([start, end, 0]))


def lossless_jpeg(image: Image.Image) -> bytes:
    """`image` (L or RGB) as an 8-bit lossless JPEG, predictor 1 (the sample to the left)."""
    pixels = np.asarray(image, dtype=np.int32)
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    height, width, components = pixels.shape
    predicted = np.empty_like(pixels)
    predicted[0, 0] = 128  # 2^(P-1) for the first sample
    predicted[0, 1:] = pixels[0, :-1]
    predicted[1:, 0] = pixels[:-1, 0]  # each later row starts from the sample above
    predicted[1:, 1:] = pixels[1:, :-1]
    bits = _Bits()
    for difference in (pixels - predicted).ravel().tolist():  # interleaved: one sample per component
        _put_difference(bits, difference)
    return (
        b"\xff\xd8"
        + _huffman_table(0, _CATEGORIES)
        + _frame(0xC3, 8, width, height, components)
        + _scan(components, 1, 0)
        + bits.flush()
        + b"\xff\xd9"
    )


def twelve_bit_jpeg(width: int, height: int, level: int = 3000) -> bytes:
    """A flat gray 12-bit sequential JPEG (SOF1): every block its DC coefficient only."""
    quantisation = _segment(0xDB, b"\x00" + b"\x01" * 64)
    bits = _Bits()
    blocks = ((width + 7) // 8) * ((height + 7) // 8)
    previous = 0
    for _ in range(blocks):
        dc = 8 * (level - 2048)
        _put_difference(bits, dc - previous)
        previous = dc
        bits.put(0, 1)  # end of block: the AC table's only code
    ac_table = _segment(0xC4, b"\x10" + b"\x01" + bytes(15) + b"\x00")
    return (
        b"\xff\xd8"
        + quantisation
        + _huffman_table(0, _CATEGORIES)
        + ac_table
        + _frame(0xC1, 12, width, height, 1)
        + _scan(1, 0, 63)
        + bits.flush()
        + b"\xff\xd9"
    )
