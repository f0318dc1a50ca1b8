from __future__ import annotations

import io
import random

import pytest
from PIL import Image

from clip_shared.mime import SNIFF_BYTES, is_accepted, sniff_mime
from tests.support import all_formats, encode, photo, png_moved


@pytest.mark.parametrize("name", sorted(all_formats(photo())))
def test_real_files_of_every_accepted_format_are_recognised_from_their_bytes(name: str) -> None:
    data, mime, _ = all_formats(photo())[name]
    assert sniff_mime(data[:SNIFF_BYTES]) == mime
    assert is_accepted(mime)


@pytest.mark.parametrize(
    ("data", "mime"),
    [
        (b"%PDF-1.7\n", "application/pdf"),
        (b"\n\nplain text that starts with newlines", None),
        (b"", None),
        (encode(photo().resize((32, 32)), "ICO"), "image/x-icon"),
    ],
)
def test_other_files_are_not_accepted_whatever_their_name(data: bytes, mime: str | None) -> None:
    assert sniff_mime(data[:SNIFF_BYTES]) == mime
    assert not is_accepted(mime)


def _mutations(data: bytes, span: int) -> list[bytes]:
    values = (0, 1, 2, 3, 4, 5, 8, 10, 12, 16, 24, 32, 40, 52, 56, 64, 108, 124, 0x7F, 0xFF)
    return [data[:offset] + bytes([value]) + data[offset + 1 :] for offset in range(span) for value in values]


@pytest.mark.parametrize(
    ("mode", "fmt"), [("RGB", "BMP"), ("P", "BMP"), ("1", "BMP"), ("RGB", "PCX"), ("L", "PCX"), ("1", "PCX")]
)
def test_every_header_the_sniffer_accepts_is_one_pillow_reads(mode: str, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The worker's own limit decides sizes, not Pillow's bomb guard (clip_worker.decoder turns it off too).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    small = photo().resize((24, 16))
    original = encode(small.quantize(16) if mode == "P" else small.convert(mode), fmt)
    accepted = 0
    for data in _mutations(original, 70):  # every byte of the file and info headers, to many values
        if is_accepted(sniff_mime(data[:SNIFF_BYTES])):
            accepted += 1
            assert Image.open(io.BytesIO(data)).format == fmt, data[:70]
    assert accepted > 1000  # most changes are to fields the decoder does not mind (sizes, resolution, palette)


@pytest.mark.parametrize(
    "data",
    [
        b"BMW 320d, 2011, 140000 km, one owner" + b" " * 100,
        b"BM" + bytes(12) + (99).to_bytes(4, "little") + bytes(200),  # no BMP header is 99 bytes
        b"BM" + bytes(12) + (40).to_bytes(4, "little") + bytes(200),  # a zero-width bitmap
        b"GIF is how you say it" + b" " * 100,
        b"\x89PNG but not a PNG at all" + b" " * 100,
    ],
    ids=["bm-text", "bm-unknown-header", "bm-zero-width", "gif-text", "png-prefix"],
)
def test_lookalikes_of_accepted_types_are_not_accepted(data: bytes) -> None:
    assert not is_accepted(sniff_mime(data[:SNIFF_BYTES]))


def test_pcx_version_4_which_pillow_cannot_read_is_not_accepted() -> None:
    pcx = bytearray(encode(photo().resize((24, 16)), "PCX"))
    assert sniff_mime(bytes(pcx[:SNIFF_BYTES])) == "image/x-pcx"
    pcx[1] = 4
    assert not is_accepted(sniff_mime(bytes(pcx[:SNIFF_BYTES])))


def test_an_animated_png_is_a_png_wherever_its_animation_chunk_is() -> None:
    frames = [photo().resize((40, 30)), photo().resize((40, 30)).rotate(90)]
    # Pillow writes an ICC profile ahead of the animation chunk, which pushes it past the first bytes.
    late = encode(frames[0], "PNG", save_all=True, append_images=frames[1:], icc_profile=random.Random(1).randbytes(1000))
    early = png_moved(late, b"acTL", after=b"IHDR")
    assert early.find(b"acTL") < SNIFF_BYTES < late.find(b"acTL")
    assert sniff_mime(early[:SNIFF_BYTES]) == sniff_mime(late[:SNIFF_BYTES]) == "image/png"
