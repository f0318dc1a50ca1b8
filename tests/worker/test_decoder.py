from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clip_shared.events import DocumentError, ErrorCode
from clip_worker.decoder import MAX_JPEG_SCANS, decode, jpeg_layout
from tests import hostile
from tests.support import all_formats, encode, photo

LIMIT = 100_000_000


@pytest.mark.parametrize("name", sorted(all_formats(photo())))
def test_every_format_decodes_to_the_picture_a_person_sees(name: str) -> None:
    data, _, expected = all_formats(photo())[name]
    decoded = decode(data, f"s3://in/{name}", min_side=10_000, max_pixels=LIMIT)
    assert decoded.mode == "RGB"
    assert decoded.size == expected.size
    # Lossy re-encodings (CMYK, EXIF-rotated JPEG) differ by a few levels; a wrong conversion by far more.
    assert np.abs(np.asarray(decoded, int) - np.asarray(expected, int)).mean() < 3


def test_transparent_pixels_become_white_not_black() -> None:
    image = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    image.paste((200, 10, 10, 255), (0, 0, 20, 40))
    decoded = np.asarray(decode(encode(image, "PNG"), "s3://in/a.png", 10_000, LIMIT))
    assert decoded[20, 30].tolist() == [255, 255, 255]
    assert decoded[20, 5].tolist() == [200, 10, 10]


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((250, 0, 0), (0, 0, 250))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    decoded = np.asarray(decode(data, "s3://in/a.gif", 10_000, LIMIT))
    assert decoded[16, 16, 0] > 200 and decoded[16, 16, 2] < 50


def test_big_jpeg_is_decoded_at_reduced_scale_but_never_below_what_the_model_needs() -> None:
    big = photo().resize((4000, 3000))
    decoded = decode(encode(big, "JPEG"), "s3://in/big.jpg", min_side=224, max_pixels=LIMIT)
    assert min(decoded.size) >= 2 * 224
    assert decoded.size == (1000, 750)  # libjpeg's 1/4 scale; 1/8 would leave 375 < 448


def test_pixel_limit_rejects_decompression_bombs_before_decoding() -> None:
    bomb = encode(Image.new("L", (3000, 3000)), "PNG")  # ~9 MP in a few KB
    with pytest.raises(DocumentError) as caught:
        decode(bomb, "s3://in/bomb.png", 224, max_pixels=1_000_000)
    assert caught.value.code == ErrorCode.TOO_MANY_PIXELS
    assert "s3://in/bomb.png" in caught.value.message and "3000x3000" in caught.value.message


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (encode(photo(), "JPEG")[:2000], ErrorCode.CORRUPT_IMAGE),
        (b"GIF89a" + b"\x00" * 50, ErrorCode.CORRUPT_IMAGE),
        (b"just some text, not a picture", ErrorCode.UNSUPPORTED_TYPE),
        (encode(photo().resize((64, 64)), "ICO"), ErrorCode.UNSUPPORTED_TYPE),
    ],
    ids=["truncated-jpeg", "broken-gif", "text", "ico"],
)
def test_bad_bytes_fail_with_a_stable_code_naming_the_object(data: bytes, code: ErrorCode) -> None:
    with pytest.raises(DocumentError) as caught:
        decode(data, "s3://in/bad-object", 224, LIMIT)
    assert caught.value.code == code
    assert "s3://in/bad-object" in caught.value.message


def test_a_jpeg_of_many_scans_is_refused_before_decoding_and_real_photos_pass() -> None:
    progressive = encode(photo(), "JPEG", progressive=True)
    assert (jpeg_layout(encode(photo(), "JPEG")).scans, jpeg_layout(progressive).scans) == (1, 10)
    assert jpeg_layout(progressive).frame == 0xC2
    assert decode(progressive, "s3://in/progressive.jpg", 224, LIMIT).size == photo().size
    # The same picture's last scan repeated: each repeat is one more pass over every coefficient.
    last = progressive.rfind(b"\xff\xda")
    bomb = progressive[:last] + progressive[last:-2] * 200 + b"\xff\xd9"
    with pytest.raises(DocumentError) as caught:
        decode(bomb, "s3://in/bomb.jpg", 224, LIMIT)
    assert caught.value.code == ErrorCode.TOO_COSTLY
    assert "s3://in/bomb.jpg is a JPEG of 209 scans" in caught.value.message


@pytest.mark.parametrize(
    "stray",
    [b"\x00", b"\xff\x00\x7f\xff", b"junk" * 100, b"\xff\xff\xff"],
    ids=["zero-byte", "stuffed-zero-and-fill", "garbage", "fill"],
)
def test_bytes_libjpeg_skips_between_segments_hide_no_scans(stray: bytes) -> None:
    """libjpeg passes over bytes that are not a marker (and FF 00, and FF fill) to the next marker,
    and decodes every scan after them: so does the count."""
    bomb = hostile.scan_bomb(repeats=100, stray=stray)
    assert jpeg_layout(bomb).scans == 109
    with pytest.raises(DocumentError) as caught:
        decode(bomb, "s3://in/bomb.jpg", 224, LIMIT)
    assert caught.value.code == ErrorCode.TOO_COSTLY


@pytest.mark.parametrize("frame", [0xC0, 0xC1, 0xC9], ids=["baseline", "extended", "arithmetic"])
def test_repeated_scans_count_in_sequential_jpegs_of_every_frame_type(frame: int) -> None:
    bomb = hostile.sequential_scan_bomb(frame, repeats=MAX_JPEG_SCANS + 1)
    assert jpeg_layout(bomb).frame == frame and jpeg_layout(bomb).scans == MAX_JPEG_SCANS + 1
    with pytest.raises(DocumentError) as caught:
        decode(bomb, "s3://in/bomb.jpg", 224, LIMIT)
    assert caught.value.code == ErrorCode.TOO_COSTLY
    assert jpeg_layout(hostile.sequential_scan_bomb(frame, repeats=1)).scans == 1


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (hostile.app_flood(), "marker segments"),
        (hostile.png_chunk_flood(), "chunks"),
        (hostile.huge_tiles(), "64x64 TIFF of 46000x46000 tiles"),
        (hostile.many_strips(5_000, declared_height=10), "lists 5000 strips or tiles where its size needs 10"),
    ],
    ids=["jpeg-app1-flood", "png-chunk-flood", "tiff-huge-tiles", "tiff-more-strips-than-rows"],
)
def test_structures_far_costlier_than_any_photo_are_refused_before_pillow_parses_them(data: bytes, says: str) -> None:
    with pytest.raises(DocumentError) as caught:
        decode(data, "s3://in/flood", 224, LIMIT)
    assert caught.value.code == ErrorCode.TOO_COSTLY
    assert caught.value.message.startswith("s3://in/flood is a") and says in caught.value.message


def test_the_structure_checks_pass_real_files_of_every_format() -> None:
    """A TIFF of one strip per row (Pillow's and ours), an animated PNG, a JPEG with metadata."""
    picture = photo()
    exif = Image.Exif()
    exif[0x010E] = "x" * 60_000
    files = {
        "rows.tif": encode(picture, "TIFF", compression="tiff_deflate", strip_size=picture.width * 3),
        "strips.tif": hostile.many_strips(64),
        "animated.png": encode(picture, "PNG", save_all=True, append_images=[picture.rotate(90)] * 50),
        "exif.jpg": encode(picture, "JPEG", exif=exif, icc_profile=b"\x00" * 300_000),
    }
    for name, data in files.items():
        assert decode(data, f"s3://in/{name}", 224, LIMIT).mode == "RGB", name
