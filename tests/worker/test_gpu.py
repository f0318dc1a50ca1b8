"""The device data path (gpu.py) run on CPU tensors: the same embeddings as open_clip, the same
fallbacks and failure records as the CPU path. On a GPU the same code runs with device=cuda."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from clip_shared import keys
from clip_worker import gpu
from clip_worker.config import WorkerConfig
from clip_worker.model import ClipModel, load
from clip_worker.runner import EXIT_OK, run
from PIL import Image, ImageOps

from tests.support import (
    INPUT_BUCKET,
    OUTPUT_BUCKET,
    TINY_MODEL,
    all_formats,
    cosine,
    encode,
    photo,
    put_manifest,
    reference_embedding,
    upload,
)
from tests.worker.test_runner import read_json

CPU = torch.device("cpu")
LIMIT = 100_000_000


def upright(data: bytes) -> Image.Image:
    """The picture a person sees in a file: Pillow's full decode, EXIF orientation applied."""
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")


def with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif)


def device_pixels(model: ClipModel, files: list[bytes]) -> torch.Tensor:
    jpegs = [gpu.probe(data, LIMIT, pin=False) for data in files]
    assert all(jpegs), "every file here is one the device path takes"
    return torch.stack(gpu.preprocess(jpegs, gpu.TensorTransform.for_model(model), CPU))


def read_outcome(s3: Any, prefix: str, model_id: str, key: str) -> tuple[str, Any]:
    """("document-created", the vector) or ("document-failed", the error) recorded for one object."""
    event = read_json(s3, keys.event_key(prefix, model_id, INPUT_BUCKET, key))
    if event["type"] == "document-failed":
        return event["type"], event["data"]["error"]
    return event["type"], np.asarray(read_json(s3, keys.vector_key(prefix, model_id, INPUT_BUCKET, key)))


def photos() -> dict[str, bytes]:
    picture = photo("astronaut.png")
    return {
        "small.jpg": encode(photo(), "JPEG", quality=90),
        "12mp.jpg": encode(picture.resize((4000, 3000)), "JPEG", quality=90),
        "portrait-exif.jpg": with_orientation(photo("coffee.png").transpose(Image.Transpose.ROTATE_90), 6),
        "progressive.jpg": encode(photo("chelsea.png"), "JPEG", quality=90, progressive=True),
        "camera.mpo": encode(picture, "MPO", save_all=True, append_images=[picture.rotate(90)]),
    }


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_comes_out_upright_like_pillow(orientation: int) -> None:
    data = with_orientation(photo().crop((0, 0, 300, 200)), orientation)
    jpeg = gpu.probe(data, LIMIT, pin=False)
    assert jpeg is not None and jpeg.orientation == orientation

    (decoded,) = gpu.decode([jpeg], CPU)

    expected = np.asarray(upright(data))
    assert decoded.permute(1, 2, 0).shape == expected.shape
    assert np.abs(decoded.permute(1, 2, 0).numpy().astype(int) - expected).mean() < 1


@pytest.mark.filterwarnings("ignore:CLIP_PRETRAINED=none")
@pytest.mark.parametrize("name", ["tiny", "ViT-B-32"])
def test_device_path_embeds_real_photos_within_cosine_0_999_of_open_clip(name: str, tiny_checkpoint: Path) -> None:
    model_name, pretrained = (TINY_MODEL, str(tiny_checkpoint)) if name == "tiny" else ("ViT-B-32", "none")
    model = load(model_name, pretrained, "cpu")
    files = photos()

    pixels = device_pixels(model, list(files.values()))
    vectors = model.embed(pixels)

    for (file, data), tensor, vector in zip(files.items(), pixels, vectors):
        reference = reference_embedding(upright(data), model_name, None if pretrained == "none" else pretrained)
        assert cosine(vector, reference) >= 0.999, file
        # The inputs themselves agree to a third of an 8-bit level (0.015 in these units) on average.
        assert (tensor - model.preprocess(upright(data))).abs().mean() < 0.005, file


def test_probe_leaves_to_the_cpu_path_what_the_device_path_cannot_decode_like_pillow() -> None:
    formats = all_formats(photo())
    good = formats["photo.jpg"][0]
    assert gpu.probe(good, LIMIT, pin=False) is not None
    cpu_path = {
        "png": formats["photo.png"][0],
        "cmyk jpeg": formats["cmyk.jpg"][0],
        "grayscale jpeg": formats["gray.jpg"][0],
        "truncated jpeg": good[: len(good) // 3],
        "text": b"a text file pretending to be a JPEG",
    }
    for kind, data in cpu_path.items():
        assert gpu.probe(data, LIMIT, pin=False) is None, kind
    width, height = photo().size
    assert gpu.probe(good, width * height - 1, pin=False) is None  # the pixel limit's message is the CPU path's


def test_a_jpeg_the_decoder_refuses_is_none_and_the_rest_of_the_batch_still_decodes() -> None:
    good = encode(photo(), "JPEG", quality=90)
    broken = bytearray(good)
    broken[len(good) // 2 : len(good) // 2 + 2000] = b"\xff\x13" * 1000  # header and end intact
    files = [good, bytes(broken), encode(photo("coffee.png"), "JPEG")]
    jpegs = [gpu.probe(data, LIMIT, pin=False) for data in files]
    assert all(jpegs)  # the header gives nothing away: only decoding finds the damage

    decoded = gpu.decode(jpegs, CPU)

    assert decoded[1] is None
    for data, image in zip(files[::2], decoded[::2]):
        assert image is not None and np.abs(image.permute(1, 2, 0).numpy().astype(int) - np.asarray(upright(data))).mean() < 1


def test_big_batches_decode_in_chunks_and_keep_their_order(monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path) -> None:
    model = load(TINY_MODEL, str(tiny_checkpoint), "cpu")
    files = [encode(photo(name).resize(size), "JPEG") for name in ("coffee.png", "chelsea.png") for size in ((640, 480), (300, 500))]
    whole = device_pixels(model, files)

    monkeypatch.setattr(gpu, "DEVICE_PIXEL_BUDGET", 400_000)  # about two of these photos at a time
    chunked = device_pixels(model, files)

    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)


def test_runner_decoding_on_the_device_gives_the_cpu_paths_vectors_and_failures(s3: Any, tiny_checkpoint: Path, tiny_config: Path) -> None:
    """The runner's device branch, forced on with the model on the CPU; every format and failure mixed in one batch."""
    formats = all_formats(photo())
    good = formats["photo.jpg"][0]
    broken = bytearray(good)
    broken[len(good) // 2 : len(good) // 2 + 2000] = b"\xff\x13" * 1000
    files = {name: data for name, (data, _, _) in formats.items()}
    files |= {
        "12mp.jpg": photos()["12mp.jpg"],
        "truncated.jpg": good[: len(good) // 3],
        "broken.jpg": bytes(broken),
        "bomb.jpg": encode(photo().resize((4000, 3400)), "JPEG"),
        "notes.jpg": b"a text file pretending to be a JPEG",
    }
    uri = put_manifest(s3, upload(s3, files))
    config = WorkerConfig(
        manifest_uri=uri,
        output_bucket=OUTPUT_BUCKET,
        model=TINY_MODEL,
        pretrained=str(tiny_checkpoint),
        model_config_path=str(tiny_config),
        device="cpu",
        batch_size=32,  # one batch: a failure inside it must not cost its neighbours
        io_threads=4,
        max_image_pixels=13_000_000,  # the 12 MP photo passes, the 13.6 MP one does not
        max_object_bytes=10_000_000,
    )

    on_device = run(replace(config, output_prefix="device/", gpu_decode=True), s3=s3)
    on_cpu = run(replace(config, output_prefix="cpu/", gpu_decode=False), s3=s3)

    assert on_device.exit_code == on_cpu.exit_code == EXIT_OK
    assert (on_device.progress.embedded, on_device.progress.failed) == (len(files) - 4, 4)
    mid = load(config.model, config.pretrained, "cpu").id
    failures = {}
    for key, data in files.items():
        outcome, detail = read_outcome(s3, "device/", mid, key)
        cpu_outcome, cpu_detail = read_outcome(s3, "cpu/", mid, key)
        assert outcome == cpu_outcome, key
        if outcome == "document-failed":
            assert detail == cpu_detail, key
            failures[key] = detail["code"]
        else:
            seen = formats[key][2] if key in formats else upright(data)
            assert cosine(detail, reference_embedding(seen, TINY_MODEL, config.pretrained)) >= 0.999, key
            assert cosine(detail, cpu_detail) >= 0.999, key
    assert failures == {
        "truncated.jpg": "corrupt-image",
        "broken.jpg": "corrupt-image",
        "bomb.jpg": "too-many-pixels",
        "notes.jpg": "unsupported-type",
    }
