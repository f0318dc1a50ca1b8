"""The device data path (device_decode.py) run on CPU tensors: the same embeddings as open_clip, the
same fallbacks and failure records as the CPU path. On a GPU the same code runs with device=cuda."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps

from clip_shared.manifest import ManifestEntry
from clip_worker import device_decode
from clip_worker.config import WorkerConfig
from clip_worker.embed import Embedder, decode_on_device, device_transform
from clip_worker.model import ClipModel, load
from clip_worker.prepare import Prepared, Stage, model_input
from clip_worker.progress import Progress
from clip_worker.reader import ObjectVersion
from clip_worker.runner import EXIT_OK, run
from clip_worker.sandbox import Sandbox
from tests import hostile
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
    stored_events,
    stored_vectors,
    upload,
)

CPU = torch.device("cpu")
LIMIT = 100_000_000


def upright(data: bytes) -> Image.Image:
    """The picture a person sees in a file: Pillow's full decode, EXIF orientation applied."""
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")


def with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif)


def jpegs(files: list[bytes]) -> list[device_decode.Jpeg]:
    found = [device_decode.probe(data, LIMIT) for data in files]
    assert all(found), "every file here is one the device path takes"
    return [jpeg for jpeg in found if jpeg is not None]


def device_pixels(model: ClipModel, files: list[bytes]) -> torch.Tensor:
    outcomes = device_decode.preprocess(
        jpegs(files), device_decode.TensorTransform.for_model(model), device_decode.DecodeStream(CPU)
    )
    tensors = [outcome for outcome in outcomes if isinstance(outcome, torch.Tensor)]
    assert len(tensors) == len(outcomes), outcomes
    return torch.stack(tensors)


def embed_on_device(model: ClipModel, files: dict[str, bytes], sandbox: Sandbox) -> tuple[dict[str, np.ndarray], list[str]]:
    """The worker's own path on the device (prepare.model_input in GPU mode, then the Embedder): vectors by file, and failures."""
    config = WorkerConfig(manifest_uri="", output_bucket="", max_image_pixels=LIMIT)
    held = device_decode.HeldBytes(1 << 30)
    embedder = Embedder(model, LIMIT, device_transform(model, True), sandbox, held)
    stage = Stage(None, model, config, True, Progress(len(files), 60), sandbox, held)
    batch = [
        Prepared(entry, ObjectVersion("etag"), model_input(data, entry.url, stage))
        for entry, data in (
            (ManifestEntry(bucket=INPUT_BUCKET, key=name, size=len(data), etag="etag", mime_type="image/jpeg"), data)
            for name, data in files.items()
        )
    ]
    failed, done = embedder.submit(batch)
    done += embedder.finish()
    return {item.entry.key: vector for item, vector in done}, [failure.entry.key for failure in failed]


def read_outcome(s3: Any, prefix: str, model_id: str, key: str) -> tuple[str, Any]:
    """("document-created", the vector) or ("document-failed", the error) recorded for one object."""
    event = stored_events(s3, model_id, prefix)[key]
    if event["type"] == "document-failed":
        return event["type"], event["data"]["error"]
    return event["type"], stored_vectors(s3, model_id, prefix)[key]


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
    (jpeg,) = jpegs([data])
    assert jpeg.orientation == orientation

    (decoded,) = device_decode.decode([jpeg], CPU)

    expected = np.asarray(upright(data))
    assert isinstance(decoded, torch.Tensor) and decoded.permute(1, 2, 0).shape == expected.shape
    assert np.abs(decoded.permute(1, 2, 0).numpy().astype(int) - expected).mean() < 1


@pytest.mark.filterwarnings("ignore:CLIP_PRETRAINED=none")
@pytest.mark.parametrize(("name", "precision"), [("tiny", "fp32"), ("tiny", "fp16"), ("tiny", "bf16"), ("ViT-B-32", "fp32")])
def test_device_path_embeds_real_photos_within_cosine_0_9999_of_open_clip(
    name: str, precision: str, tiny_checkpoint: Path
) -> None:
    """fp16 is what the worker runs on CUDA; the model loads and embeds in it here too, on CPU tensors."""
    model_name, pretrained = (TINY_MODEL, str(tiny_checkpoint)) if name == "tiny" else ("ViT-B-32", "none")
    model = load(model_name, pretrained, "cpu", precision=precision)
    files = photos()

    inputs = device_pixels(model, list(files.values()))
    vectors = model.embed(inputs)

    assert inputs.dtype == {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    for (file, data), tensor, vector in zip(files.items(), inputs, vectors, strict=True):
        reference = reference_embedding(upright(data), model_name, None if pretrained == "none" else pretrained)
        assert cosine(vector, reference) >= 0.9999, file
        # The inputs themselves agree to a third of an 8-bit level (0.015 in these units) on average.
        assert (tensor.float() - model.preprocess(upright(data)).to(model.dtype).float()).abs().mean() < 0.005, file


def test_probe_leaves_to_the_cpu_path_what_the_device_path_cannot_decode_like_pillow() -> None:
    formats = all_formats(photo())
    good = formats["photo.jpg"][0]
    assert device_decode.probe(good, LIMIT) is not None
    cpu_path = {
        "png": formats["photo.png"][0],
        "cmyk jpeg": formats["cmyk.jpg"][0],
        "grayscale jpeg": formats["gray.jpg"][0],
        "truncated jpeg": good[: len(good) // 3],
        "text": b"a text file pretending to be a JPEG",
    }
    for kind, data in cpu_path.items():
        assert device_decode.probe(data, LIMIT) is None, kind
    width, height = photo().size
    assert device_decode.probe(good, width * height - 1) is None  # the pixel limit's message is the CPU path's


def test_probe_never_decodes_what_it_leaves_to_the_cpu_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's getexif decodes a whole PNG to look for its EXIF chunk (a 400 MP PNG of 1 MB: +1.5 GB),
    so the format is read from the bytes first; a JPEG the device does not decode (arithmetic-coded,
    a scan bomb with a stray byte, a metadata flood) is not even opened."""
    loads: list[str | None] = []
    load = ImageFile.ImageFile.load

    def counted(image: ImageFile.ImageFile) -> Any:
        loads.append(image.format)
        return load(image)

    exif = Image.Exif()
    exif[0x0112] = 6
    cpu_path = {
        "png": encode(Image.new("L", (3000, 3000)), "PNG", exif=exif),
        "arithmetic": hostile.sequential_scan_bomb(0xC9, repeats=1),
        "scan bomb": hostile.scan_bomb(),
        "flood": hostile.app_flood(),
    }
    monkeypatch.setattr(ImageFile.ImageFile, "load", counted)
    for kind, data in cpu_path.items():
        assert device_decode.probe(data, LIMIT) is None, kind
    assert loads == []


def test_jpeg_bytes_held_for_the_device_are_bounded_and_given_back_once_decoded(tiny_checkpoint: Path, sandbox: Sandbox) -> None:
    """Past the bound a JPEG takes the CPU path at once: the same vector, no bytes held, no waiting."""
    model = load(TINY_MODEL, str(tiny_checkpoint), "cpu")
    files = {f"{index}.jpg": encode(photo().rotate(index * 90, expand=True), "JPEG", quality=90) for index in range(4)}
    held = device_decode.HeldBytes(max(map(len, files.values())) * 2)
    config = WorkerConfig(manifest_uri="", output_bucket="", max_image_pixels=LIMIT)
    stage = Stage(None, model, config, True, Progress(len(files), 60), sandbox, held)

    inputs = [model_input(data, name, stage) for name, data in files.items()]

    assert [type(item) for item in inputs] == [device_decode.Jpeg] * 2 + [torch.Tensor] * 2
    assert held.held == sum(len(data) for data in list(files.values())[:2]) <= held.limit
    embedder = Embedder(model, LIMIT, device_transform(model, True), sandbox, held)
    entries = [ManifestEntry(bucket=INPUT_BUCKET, key=name, size=1, etag="etag", mime_type="image/jpeg") for name in files]
    failed, done = embedder.submit(
        [Prepared(entry, ObjectVersion("etag"), item) for entry, item in zip(entries, inputs, strict=True)]
    )
    done += embedder.finish()
    assert failed == [] and held.held == 0
    for item, vector in done:
        data = files[item.entry.key]
        assert cosine(vector, model.embed(model.prepare(data, item.entry.key, LIMIT).unsqueeze(0))[0]) >= 0.9999


def test_a_jpeg_of_extreme_shape_is_embedded_at_a_cost_set_by_the_model_input(tiny_checkpoint: Path, sandbox: Sandbox) -> None:
    """Resized on the device, a 65000x1 JPEG would first become 4,160,000x64 (3 GB in float32): the
    device path leaves it to the CPU path, which crops first. A 16:1 panorama stays on the device."""
    model = load(TINY_MODEL, str(tiny_checkpoint), "cpu")
    extreme = {"wide.jpg": encode(photo().resize((65000, 1)), "JPEG"), "tall.jpg": encode(photo().resize((1, 65000)), "JPEG")}
    panorama = encode(photo("astronaut.png").resize((3200, 200)), "JPEG", quality=90)
    assert all(device_decode.probe(data, LIMIT) is None for data in extreme.values())
    assert device_decode.probe(panorama, LIMIT) is not None

    started = time.perf_counter()
    vectors, failed = embed_on_device(model, extreme | {"panorama.jpg": panorama}, sandbox)

    assert time.perf_counter() - started < 10  # the 4,160,000x64 resize alone takes longer
    assert failed == [] and set(vectors) == {"wide.jpg", "tall.jpg", "panorama.jpg"}
    on_cpu = model.embed(model.prepare(panorama, "panorama.jpg", LIMIT).unsqueeze(0))[0]
    assert cosine(vectors["panorama.jpg"], on_cpu) >= 0.9999


def test_a_jpeg_the_decoder_refuses_is_an_error_and_the_rest_of_the_batch_still_decodes() -> None:
    good = encode(photo(), "JPEG", quality=90)
    broken = bytearray(good)
    broken[len(good) // 2 : len(good) // 2 + 2000] = b"\xff\x13" * 1000  # header and end intact
    files = [good, bytes(broken), encode(photo("coffee.png"), "JPEG")]

    decoded = device_decode.decode(jpegs(files), CPU)  # the header gives nothing away: only decoding finds the damage

    assert isinstance(decoded[1], RuntimeError)
    for data, image in zip(files[::2], decoded[::2], strict=True):
        assert isinstance(image, torch.Tensor)
        assert np.abs(image.permute(1, 2, 0).numpy().astype(int) - np.asarray(upright(data))).mean() < 1


def test_a_failure_on_the_device_costs_that_image_a_trip_to_the_cpu_path_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path, sandbox: Sandbox
) -> None:
    """Out of memory in the batched decode and in one image's decode, and the antialiased resize's
    CUDA limit on another: every image is still embedded, each as the CPU path embeds it."""
    model = load(TINY_MODEL, str(tiny_checkpoint), "cpu")
    files = {
        f"{width}.jpg": encode(photo("coffee.png").resize((width, 300)), "JPEG", quality=90) for width in (400, 410, 420, 430)
    }
    decode_jpeg = device_decode.decode_jpeg

    def short_of_memory(data: Any, mode: Any, device: torch.device) -> Any:
        if isinstance(data, list) or data.numel() == len(files["410.jpg"]):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return decode_jpeg(data, mode, device)

    crop = device_decode.TensorTransform.crop

    def limited_crop(transform: device_decode.TensorTransform, image: torch.Tensor) -> torch.Tensor:
        if image.shape[-1] == 420:
            raise RuntimeError("Provided interpolation parameters can not be handled with current algorithm implementation. ")
        return crop(transform, image)

    monkeypatch.setattr(device_decode, "decode_jpeg", short_of_memory)
    monkeypatch.setattr(device_decode.TensorTransform, "crop", limited_crop)

    vectors, failed = embed_on_device(model, files, sandbox)

    assert failed == [] and set(vectors) == set(files)
    for name, data in files.items():
        on_cpu = model.embed(model.prepare(data, name, LIMIT).unsqueeze(0))[0]
        assert cosine(vectors[name], on_cpu) >= 0.9999, name


def test_decoding_waits_for_its_own_stream_and_hands_the_batch_over_to_the_models(
    monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path
) -> None:
    """What keeps nvJPEG from overwriting memory the model's queued work still reads (CUDA only),
    checked with a stream that records what the device path asks of it."""
    events: list[object] = []

    class Recording(device_decode.DecodeStream):
        @contextmanager
        def current(self) -> Iterator[None]:
            events.append("enter")
            yield
            events.append("exit")

        def idle(self) -> None:
            events.append("idle")

        def hand_over(self, tensor: torch.Tensor) -> None:
            events.append(("hand over", tensor.untyped_storage().data_ptr()))

    decode_jpeg = device_decode.decode_jpeg

    def recorded_decode(*args: Any) -> Any:
        events.append("decode")
        return decode_jpeg(*args)

    monkeypatch.setattr(device_decode, "decode_jpeg", recorded_decode)
    monkeypatch.setattr(device_decode, "DEVICE_PIXEL_BUDGET", 1)  # one chunk, so one decode, per photo
    model = load(TINY_MODEL, str(tiny_checkpoint), "cpu")
    files = [encode(photo(name), "JPEG") for name in ("coffee.png", "chelsea.png", "astronaut.png")]

    rows = device_decode.preprocess(jpegs(files), device_decode.TensorTransform.for_model(model), Recording(CPU))

    assert events[:-1] == ["enter", "idle", "decode", "idle", "decode", "idle", "decode", "exit"]
    assert all(isinstance(row, torch.Tensor) and events[-1] == ("hand over", row.untyped_storage().data_ptr()) for row in rows)


def test_big_batches_decode_in_chunks_and_keep_their_order(monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path) -> None:
    model = load(TINY_MODEL, str(tiny_checkpoint), "cpu")
    files = [
        encode(photo(name).resize(size), "JPEG") for name in ("coffee.png", "chelsea.png") for size in ((640, 480), (300, 500))
    ]
    whole = device_pixels(model, files)

    monkeypatch.setattr(device_decode, "DEVICE_PIXEL_BUDGET", 400_000)  # about two of these photos at a time
    chunked = device_pixels(model, files)

    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("device", "hardware_decoder", "gpu_decode", "on_device"),
    [
        ("cuda", True, None, True),  # A100, H100, L4...: nvJPEG's hardware engine
        ("cuda", False, None, False),  # T4, A10G: Pillow's reduced-scale decoding in the prepare threads
        ("cuda", False, True, True),  # GPU_DECODE=on, where a benchmark says nvJPEG wins anyway
        ("cuda", True, False, False),  # GPU_DECODE=off
        ("cpu", False, None, False),
    ],
)
def test_gpu_decode_auto_decodes_on_the_gpu_only_where_it_has_a_hardware_jpeg_decoder(
    monkeypatch: pytest.MonkeyPatch, device: str, hardware_decoder: bool, gpu_decode: bool | None, on_device: bool
) -> None:
    if device == "cuda":
        monkeypatch.setattr(device_decode, "hardware_jpeg_decoder", lambda _: hardware_decoder)
    assert decode_on_device(torch.device(device), gpu_decode) is on_device


def test_runner_decoding_on_the_device_gives_the_cpu_paths_vectors_and_failures(
    s3: Any, tiny_checkpoint: Path, tiny_config: Path
) -> None:
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
            assert cosine(detail, reference_embedding(seen, TINY_MODEL, config.pretrained)) >= 0.9999, key
            assert cosine(detail, cpu_detail) >= 0.9999, key
    assert failures == {
        "truncated.jpg": "corrupt-image",
        "broken.jpg": "corrupt-image",
        "bomb.jpg": "too-many-pixels",
        "notes.jpg": "unsupported-type",
    }
