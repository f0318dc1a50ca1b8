from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from clip_shared.events import DocumentError, ErrorCode
from clip_worker.decoder import MAX_JPEG_SCANS, MAX_TIFF_PAGES, decode, jpeg_layout
from tests import hostile
from tests.jpeg_writer import lossless_jpeg, twelve_bit_jpeg
from tests.support import all_formats, encode, photo, png_moved

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


def close_to(decoded: Image.Image, expected: Image.Image, tolerance: float = 3) -> bool:
    return (
        decoded.size == expected.size
        and np.abs(np.asarray(decoded, int) - np.asarray(expected.convert("RGB"), int)).mean() < tolerance
    )


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_lossless_jpeg_decodes_whole_where_a_lossy_one_would_be_scaled(mode: str) -> None:
    picture = photo().resize((120, 80)).convert(mode)
    # min_side 16 would let libjpeg scale a lossy JPEG by 1/2; lossless mode cannot scale at all.
    assert close_to(decode(lossless_jpeg(picture), "s3://in/lossless.jpg", 16, LIMIT), picture, tolerance=0.01)


def test_a_12_bit_jpeg_is_an_unsupported_type_not_a_corrupt_file() -> None:
    with pytest.raises(DocumentError) as caught:
        decode(twelve_bit_jpeg(64, 48), "s3://in/deep.jpg", 224, LIMIT)
    assert caught.value.code == ErrorCode.UNSUPPORTED_TYPE
    assert "12-bit" in caught.value.message and "s3://in/deep.jpg" in caught.value.message


def ramp(dtype: type, low: float, high: float) -> Image.Image:
    """A left-to-right ramp from `low` to `high` in a 32-bit TIFF."""
    values: np.ndarray = np.tile(np.linspace(low, high, 64), (16, 1)).astype(dtype)
    return Image.open(io.BytesIO(encode(Image.fromarray(values), "TIFF")))


@pytest.mark.parametrize(
    ("image", "mode"),
    [
        (ramp(np.float32, 0, 1), "F"),  # the usual float convention
        (ramp(np.float32, -3.5, 1200.0), "F"),  # a depth map, HDR radiance
        (ramp(np.int32, 0, 409_500_000), "I"),
        (ramp(np.int32, -70_000, 70_000), "I"),
    ],
    ids=["float-0-1", "float-wide", "int32", "int32-signed"],
)
def test_32_bit_and_float_tiffs_are_scaled_by_their_range_not_clipped(image: Image.Image, mode: str) -> None:
    assert image.mode == mode
    decoded = np.asarray(decode(encode(image, "TIFF"), "s3://in/ramp.tif", 10_000, LIMIT), int)[8, :, 0]
    assert decoded[0] == 0 and decoded[-1] == 255
    assert np.all(np.diff(decoded) >= 0) and len(set(decoded.tolist())) > 50  # a ramp, not black or white


def test_a_float_tiff_with_nan_and_infinity_uses_its_finite_range() -> None:
    values = np.tile(np.linspace(0, 50, 64, dtype=np.float32), (16, 1))
    values[0, :4] = [np.nan, np.inf, -np.inf, np.nan]
    decoded = np.asarray(decode(encode(Image.fromarray(values), "TIFF"), "s3://in/nan.tif", 10_000, LIMIT), int)
    assert decoded[8, 0, 0] == 0 and decoded[8, -1, 0] == 255
    flat = np.full((16, 16), np.nan, dtype=np.float32)
    assert decode(encode(Image.fromarray(flat), "TIFF"), "s3://in/nan.tif", 10_000, LIMIT).size == (16, 16)


@pytest.mark.parametrize(
    ("image", "key"),
    [
        (Image.new("RGB", (40, 40), (0, 0, 0)), (0, 0, 0)),
        (Image.new("L", (40, 40), 0), 0),
        (Image.fromarray(np.zeros((40, 40), np.uint16)), 0),
    ],
    ids=["rgb", "gray", "gray16"],
)
def test_a_colour_key_is_transparency_flattened_onto_white(image: Image.Image, key: int | tuple[int, ...]) -> None:
    image.paste(200 if image.mode == "L" else 50_000 if image.mode != "RGB" else (200, 10, 10), (0, 0, 20, 40))
    decoded = np.asarray(decode(encode(image, "PNG", transparency=key), "s3://in/keyed.png", 10_000, LIMIT))
    assert decoded[20, 30].tolist() == [255, 255, 255]  # the key colour: transparent
    assert decoded[20, 5].tolist() != [255, 255, 255]


def pages(*sizes: tuple[int, int]) -> bytes:
    images = [photo().resize(size) for size in sizes]
    return encode(images[0], "TIFF", save_all=True, append_images=images[1:])


def test_a_multi_page_tiff_gives_its_largest_page_within_the_limit() -> None:
    assert decode(pages((60, 40), (300, 200), (120, 80)), "s3://in/scan.tif", 10_000, LIMIT).size == (300, 200)
    # The full-size level of a pyramid over the limit: the next one down is embedded rather than none.
    assert decode(pages((300, 200), (150, 100), (75, 50)), "s3://in/pyramid.tif", 10_000, 20_000).size == (150, 100)
    with pytest.raises(DocumentError) as caught:
        decode(pages((300, 200), (290, 200)), "s3://in/big.tif", 10_000, 20_000)
    assert caught.value.code == ErrorCode.TOO_MANY_PIXELS


def test_only_the_first_pages_of_a_tiff_are_looked_at() -> None:
    many = pages(*[(20, 20)] * MAX_TIFF_PAGES, (200, 200))
    assert decode(many, "s3://in/many.tif", 10_000, LIMIT).size == (20, 20)


@pytest.mark.parametrize("chunk", ["icc", "zTXt", "iTXt", "many-zTXt", "huge-xmp"])
def test_a_png_with_megabytes_of_metadata_is_not_called_corrupt(chunk: str) -> None:
    picture = photo().resize((60, 40))
    info = PngImagePlugin.PngInfo()
    if chunk == "zTXt":
        info.add_text("Comment", "a long history " * 1_500_000, zip=True)  # 22 MB inflated
    elif chunk == "many-zTXt":
        for index in range(8):  # 88 MB of text in all
            info.add_text(f"Comment {index}", "a long history " * 750_000, zip=True)
    elif chunk == "iTXt":
        info.add_itxt("XML:com.adobe.xmp", "<x:xmpmeta>" + "<rdf:li>ancestor</rdf:li>" * 120_000 + "</x:xmpmeta>", zip=True)
    elif chunk == "huge-xmp":  # Photoshop's document history past every limit: skipped, not fatal
        info.add_itxt("XML:com.adobe.xmp", "<x:xmpmeta>" + "<rdf:li>ancestor</rdf:li>" * 1_000_000 + "</x:xmpmeta>", zip=True)
    profile = bytes(3_000_000) if chunk == "icc" else None
    data = encode(picture, "PNG", pnginfo=info, icc_profile=profile)
    assert close_to(decode(data, "s3://in/meta.png", 10_000, LIMIT), picture, tolerance=0.01)


def test_an_animated_png_gives_its_default_image_wherever_its_animation_chunk_is() -> None:
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((250, 0, 0), (0, 0, 250))]
    late = encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    for data in (late, png_moved(late, b"acTL", after=b"IHDR")):
        decoded = np.asarray(decode(data, "s3://in/a.png", 10_000, LIMIT))
        assert decoded[16, 16, 0] > 200 and decoded[16, 16, 2] < 50


XMP_ROTATE_90 = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
)


def sideways_files() -> dict[str, bytes]:
    """The same photo stored turned a quarter, with "rotate 90 CW to display" said each way a format can."""
    sideways = photo().resize((90, 60)).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    xmp_png = PngImagePlugin.PngInfo()
    xmp_png.add_itxt("XML:com.adobe.xmp", XMP_ROTATE_90)
    png_exif = encode(sideways, "PNG", exif=exif)
    png_xmp = encode(sideways, "PNG", pnginfo=xmp_png)
    # ImageMagick's way: the EXIF block in hex, as a compressed text chunk.
    raw = exif.tobytes().hex()
    imagemagick = PngImagePlugin.PngInfo()
    lines = "\n".join(raw[start : start + 72] for start in range(0, len(raw), 72))
    imagemagick.add_text("Raw profile type exif", f"\nexif\n{len(raw) // 2:8d}\n{lines}\n", zip=True)
    return {
        "jpeg-exif": encode(sideways, "JPEG", quality=95, exif=exif),
        "jpeg-xmp": encode(sideways, "JPEG", quality=95, xmp=XMP_ROTATE_90.encode()),
        "png-exif": png_exif,
        "png-exif-after-pixels": png_moved(png_exif, b"eXIf", after=b"IDAT"),
        "png-xmp": png_xmp,
        "png-xmp-after-pixels": png_moved(png_xmp, b"iTXt", after=b"IDAT"),
        "png-imagemagick-exif": encode(sideways, "PNG", pnginfo=imagemagick),
        "webp-exif": encode(sideways, "WEBP", lossless=True, exif=exif),
        "webp-xmp": encode(sideways, "WEBP", lossless=True, xmp=XMP_ROTATE_90.encode()),
        "tiff-orientation": encode(sideways, "TIFF", exif=exif),
    }


@pytest.mark.parametrize("name", sorted(sideways_files()))
def test_the_upright_picture_is_embedded_whichever_metadata_says_how_to_turn_it(name: str) -> None:
    upright = photo().resize((90, 60))
    assert close_to(decode(sideways_files()[name], f"s3://in/{name}", 10_000, LIMIT), upright, tolerance=4)
