"""Preparing an image costs what the model's input costs, whatever the image's shape or size claims."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms

from clip_shared.events import DocumentError, ErrorCode
from clip_worker.decoder import decode
from clip_worker.transform import Preprocess
from tests.support import photo

REPOSITORY = Path(__file__).resolve().parents[2]


def png(width: int, height: int, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("size", [(1200, 800), (801, 1203), (224, 300), (50, 40), (3000, 7), (9, 2000)])
def test_bounded_preprocess_gives_exactly_open_clips_pixels(resize_mode: str, size: tuple[int, int]) -> None:
    compose = open_clip.image_transform(224, is_train=False, resize_mode=resize_mode)
    picture = photo("astronaut.png").resize(size)
    expected = compose(picture)
    actual = Preprocess(compose)(picture)
    if resize_mode != "shortest" or max(size) <= 4 * min(size):
        assert torch.equal(actual, expected)
    else:
        # The crop's box sits tens of thousands of resized pixels in: the filter's centres round in
        # the last bits, which moves a pixel by at most a level or two.
        assert (actual - expected).abs().max() <= 3 / 255 / 0.26 and (actual - expected).abs().mean() < 0.002


@pytest.mark.parametrize("size", [(90, 61), (61, 90), (200, 61), (61, 61)])
def test_a_crop_larger_than_the_resize_pads_with_black_as_torchvision_does(size: tuple[int, int]) -> None:
    # Both sides of the crop past the resized picture on some sizes, one side on others, odd margins.
    compose = transforms.Compose([transforms.Resize(60), transforms.CenterCrop((71, 64)), transforms.ToTensor()])
    picture = photo("coffee.png").resize(size)
    assert torch.equal(Preprocess(compose)(picture), compose(picture))


def test_an_unfamiliar_transform_sees_at_most_a_four_to_one_centre() -> None:
    compose = open_clip.image_transform(224, is_train=False)
    seen: list[tuple[int, int]] = []

    def unfamiliar(image: Image.Image) -> torch.Tensor:
        seen.append(image.size)
        return compose(image)

    Preprocess(unfamiliar)(Image.new("RGB", (40_000, 10)))
    assert seen == [(40, 10)]


POISON_SCRIPT = """
import io, resource, sys, time, warnings
warnings.simplefilter("ignore")
from PIL import Image
from torchvision import transforms
from clip_worker.model import load
model = load("ViT-B-32", "none", "cpu")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
for width, height, mode in [(40000, 1, "L"), (1, 100000, "L"), (100000, 1, "RGBA"), (65535, 3, "RGB")]:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, "PNG")
    started = time.monotonic()
    pixels = model.prepare(buffer.getvalue(), f"s3://in/{width}x{height}.png", 100_000_000)
    print(width, height, len(buffer.getvalue()), tuple(pixels.shape), round(time.monotonic() - started, 3), flush=True)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
"""


def test_extreme_aspect_ratios_cost_what_the_model_input_costs() -> None:
    """An 85-byte 40000x1 PNG took 18.7 s and 9.7 GB; 100000x1 would need 24 GB (a killed container)."""
    done = subprocess.run([sys.executable, "-c", POISON_SCRIPT], capture_output=True, text=True, cwd=REPOSITORY, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line.split() for line in done.stdout.splitlines()]
    assert len(lines) == 6
    for width, height, size, shape, seconds in ((*line[:3], " ".join(line[3:6]), line[6]) for line in lines[1:5]):
        assert shape == "(3, 224, 224)", (width, height)
        assert int(size) < 1000 and float(seconds) < 2.0, (width, height, size, seconds)
    # Peak resident memory (KiB) grew by less than 100 MB over what torch and the model took.
    assert int(lines[5][0]) - int(lines[0][0]) < 100_000, (lines[0], lines[5])


@pytest.mark.parametrize("max_pixels", [1_000, 100_000_000, 500_000_000])
def test_too_many_pixels_is_reported_with_the_limit_above_and_below_pillows_own(max_pixels: int) -> None:
    # 30000x30000 is over Pillow's own bomb guard (~179 MP), which reported it as corrupt.
    data = png(30_000, 30_000)
    with pytest.raises(DocumentError) as caught:
        decode(data, "s3://in/huge.png", 224, max_pixels)
    assert caught.value.code == ErrorCode.TOO_MANY_PIXELS
    assert f"over the {max_pixels}-pixel limit" in caught.value.message and "30000x30000" in caught.value.message


def test_a_limit_above_pillows_guard_lets_such_an_image_through() -> None:
    data = png(13_500, 13_400)  # 180.9 MP: over Pillow's 178,956,970, under ours
    assert decode(data, "s3://in/big.png", 224, 200_000_000).size == (13_500, 13_400)
