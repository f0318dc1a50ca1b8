"""Image bytes -> an upright RGB picture, as small as the model's preprocessing allows.

Every supported format ends up as 8-bit RGB the way a person would see it: EXIF orientation
applied, transparency flattened onto white, CMYK, palette, 16-bit and grayscale converted.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from clip_shared.events import DocumentError, ErrorCode
from clip_shared.mime import SNIFF_BYTES, is_accepted, sniff_mime

#: Pillow's format names for the MIME types the pipeline accepts (MPO is a camera JPEG).
SUPPORTED_FORMATS = frozenset({"BMP", "GIF", "JPEG", "MPO", "PNG", "TIFF", "WEBP", "PCX"})

_SIXTEEN_BIT = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_WITH_ALPHA = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})


def decode(data: bytes, url: str, min_side: int, max_pixels: int) -> Image.Image:
    """Decode `data` (the object at `url`) to RGB.

    `min_side` is the smallest side the preprocessing needs; a JPEG is decoded by libjpeg at
    1/2, 1/4 or 1/8 scale when that still leaves both sides at least twice that large, which
    skips most of the decoding work on big photos and changes nothing the resize would keep.
    """
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below decides; Pillow's warning about it would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in SUPPORTED_FORMATS:
                raise DocumentError(
                    ErrorCode.UNSUPPORTED_TYPE, f"{url} is a {image.format} image, which the pipeline does not embed"
                )
            width, height = image.size
            if width * height > max_pixels:
                raise DocumentError(
                    ErrorCode.TOO_MANY_PIXELS,
                    f"{url} is {width}x{height} = {width * height} pixels, over the {max_pixels}-pixel limit "
                    "(MAX_IMAGE_PIXELS)",
                )
            if image.format in ("JPEG", "MPO"):
                # Twice the target keeps the final resize a real antialiasing downscale: at 1x, libjpeg's
                # block averaging alone sets the pixels and 2 MP photos drift to cosine ~0.9995.
                image.draft("RGB", (2 * min_side, 2 * min_side))
            image = ImageOps.exif_transpose(image)
            image.load()
            return to_rgb(image)
    except DocumentError:
        raise
    except UnidentifiedImageError as exc:
        sniffed = sniff_mime(data[:SNIFF_BYTES])
        if is_accepted(sniffed):
            raise DocumentError(ErrorCode.CORRUPT_IMAGE, f"{url} starts like {sniffed} but is not a readable image") from exc
        kind = f"a {sniffed} file" if sniffed else "not a recognisable file type"
        raise DocumentError(ErrorCode.UNSUPPORTED_TYPE, f"{url} is {kind}, not an image the pipeline embeds") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
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
