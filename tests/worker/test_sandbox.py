"""The decoding sandbox: an upload over its budget fails alone with too-costly, within the budget,
and the next object is decoded as if nothing happened. Budgets are small here so the tests stay quick;
each hostile file below passes every structure check, so only the operating system stops it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

from clip_shared.events import DocumentError, ErrorCode
from clip_worker.model import model_input
from clip_worker.pixels import Geometry, model_pixels
from clip_worker.sandbox import Limits, Sandbox, SandboxError
from clip_worker.transform import Preprocess
from tests import hostile
from tests.support import encode, photo

LIMIT = 100_000_000
BUDGET = Limits(cpu_s=1, memory_mb=160, wall_s=10)


@pytest.fixture(scope="module")
def preprocess() -> Preprocess:
    return Preprocess(open_clip.image_transform(64, is_train=False))


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(BUDGET, 1) as started:
        yield started


def refusal(call: Callable[[], object]) -> DocumentError:
    with pytest.raises(DocumentError) as caught:
        call()
    return caught.value


@pytest.mark.parametrize(
    ("make", "limit"),
    [
        (hostile.rle_end_of_lines, "over 1 s of CPU time (DECODE_CPU_SECONDS)"),
        (lambda: hostile.many_strips(300_000), "over 1 s of CPU time (DECODE_CPU_SECONDS)"),
        (hostile.flat_rgba_png, "over 160 MB of memory (DECODE_MEMORY_MB)"),
    ],
    ids=["rle8-bmp-of-end-of-line-codes", "tiff-of-300k-strips", "transparent-png-of-16-mp"],
)
def test_an_upload_over_its_budget_fails_alone_and_the_next_one_decodes(
    sandbox: Sandbox, preprocess: Preprocess, make: Callable[[], bytes], limit: str
) -> None:
    data, good = make(), encode(photo(), "JPEG")
    started = time.monotonic()

    error = refusal(lambda: model_input(data, "s3://in/hostile", preprocess, 64, LIMIT, sandbox))

    assert time.monotonic() - started < BUDGET.wall_s
    assert error.code == ErrorCode.TOO_COSTLY
    assert error.message == f"s3://in/hostile: decoding went past the budget of one object: {limit}"
    pixels = model_input(good, "s3://in/good.jpg", preprocess, 64, LIMIT, sandbox)
    assert torch.equal(pixels, model_input(good, "s3://in/good.jpg", preprocess, 64, LIMIT))


def test_a_helper_that_kept_much_of_an_object_is_replaced_before_the_next() -> None:
    # A helper's heap keeps freed buffers for speed; what it kept past RETAINED_BYTES would be lent to
    # the next object on top of its own budget, so a fresh helper takes the next object instead.
    crop = Geometry(224, (224, 224), Image.Resampling.BICUBIC)
    with Sandbox(Limits(cpu_s=20, memory_mb=512, wall_s=60), 1) as sandbox:
        first = sandbox.pids
        for _ in range(3):
            sandbox.run("s3://in/photo.jpg", model_pixels, encode(photo(), "JPEG"), "s3://in/photo.jpg", crop, 224, LIMIT)
        assert sandbox.pids == first  # a photo leaves little: the same helper, warm
        # 80 MB the helper keeps for good (the C environment holds its own copy), as a fragmented heap would.
        sandbox.run("s3://in/ballast", os.putenv, "CLIP_TEST_BALLAST", "x" * (80 * 1024 * 1024))
        assert sandbox.pids != first


def test_an_object_past_the_wall_deadline_is_stopped(preprocess: Preprocess) -> None:
    with Sandbox(Limits(cpu_s=60, memory_mb=160, wall_s=1), 1) as sandbox:
        sandbox.run("warm", sum, [1])  # the helper's start is not the object's time
        started = time.monotonic()
        error = refusal(lambda: sandbox.run("s3://in/slow", time.sleep, 30))
        assert time.monotonic() - started < 5
        assert error.code == ErrorCode.TOO_COSTLY and "over 1 s (DECODE_WALL_SECONDS)" in error.message
        assert sandbox.run("next", sum, [1, 2]) == 3


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
def test_a_helper_makes_open_clips_own_model_input_without_loading_torch(sandbox: Sandbox, resize_mode: str) -> None:
    """The helper decodes and crops, the caller normalises: the very tensor the transform makes in
    one process, with 8-bit pixels on the pipe and no torch (hundreds of MB a helper) in the helper."""
    preprocess = Preprocess(open_clip.image_transform(64, is_train=False, resize_mode=resize_mode))
    picture = photo("chelsea.png")

    pixels = model_input(encode(picture, "PNG"), "s3://in/cat.png", preprocess, 64, LIMIT, sandbox)

    assert torch.equal(pixels, preprocess(picture))
    maps = Path(f"/proc/{sandbox.run('pid', os.getpid)}/maps").read_text()
    assert "libtorch" not in maps and "libc10" not in maps


def test_a_transform_not_known_step_by_step_runs_whole_in_the_helper() -> None:
    """open_clip's `longest` mode ends in its own resize and pad: the helper imports torch for it, on
    that call, outside the object's budget, and gives the very tensor this process would."""
    compose = open_clip.image_transform(64, is_train=False, resize_mode="longest")
    data = encode(photo("coffee.png"), "JPEG")
    with Sandbox(Limits(cpu_s=1, memory_mb=160, wall_s=120), 1) as sandbox:
        pixels = model_input(data, "s3://in/coffee.jpg", Preprocess(compose), 64, LIMIT, sandbox)
    assert torch.equal(pixels, model_input(data, "s3://in/coffee.jpg", Preprocess(compose), 64, LIMIT))
    assert pixels.shape == (3, 64, 64)


def test_a_decoder_that_kills_its_process_fails_that_object_as_crashes_worker(sandbox: Sandbox) -> None:
    error = refusal(lambda: sandbox.run("s3://in/crash", os.abort))
    assert error.code == ErrorCode.CRASHES_WORKER and "SIGABRT" in error.message
    assert sandbox.run("next", sum, [1, 2]) == 3


def test_what_the_decoder_raises_comes_back_as_itself(sandbox: Sandbox, preprocess: Preprocess) -> None:
    error = refusal(lambda: model_input(b"not an image", "s3://in/text", preprocess, 64, LIMIT, sandbox))
    assert error.code == ErrorCode.UNSUPPORTED_TYPE and "s3://in/text" in error.message


def test_a_helper_that_cannot_start_is_no_objects_fault() -> None:
    with Sandbox(BUDGET, 1, ("clip_worker.no_such_module",)) as broken:
        with pytest.raises(SandboxError, match="did not start"):
            broken.run("s3://in/photo.jpg", sum, [1])
