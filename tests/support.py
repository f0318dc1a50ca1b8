"""Helpers the tests share: real photos in every format, a tiny open_clip model, open_clip's reference embedding."""

from __future__ import annotations

import io
import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pyarrow.parquet as pq
import skimage
import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin

from clip_shared import keys
from clip_shared.events import from_json_batch
from clip_shared.manifest import ManifestEntry, split
from clip_shared.mime import sniff_mime
from clip_worker.config import WorkerConfig

PHOTOS = Path(skimage.__file__).parent / "data"
INPUT_BUCKET = "input-bucket"
OUTPUT_BUCKET = "output-bucket"
#: Keys real buckets hold that URL and SQL handling get wrong: a fragment or query marker, leading and
#: doubled slashes, whitespace, `+` and `%` (S3 URL-encodes notification keys, spaces as `+`), quotes,
#: unicode, and the longest key S3 allows. Every layer's tests run some of them end to end.
AWKWARD_KEYS = (
    "IMG #12.jpg",
    "photo#1.jpg",
    "what?size=1.jpg",
    "/leading-slash.jpg",
    "dir//double slash.jpg",
    "tab\there.jpg",
    "a+b c%2B.jpg",
    "caf\u00e9/\u2603 na\u00efve.jpg",
    'it\'s "quoted" ; semi.jpg',
    "back\\slash.jpg",
    "k/" + "x" * 1018 + ".jpg",
)
#: A CLIP small enough to run in milliseconds on a CPU; same code paths as ViT-B-32.
TINY_MODEL = "test-tiny-clip"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def photo(name: str = "chelsea.png") -> Image.Image:
    return Image.open(PHOTOS / name).convert("RGB")


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def all_formats(image: Image.Image) -> dict[str, tuple[bytes, str, Image.Image]]:
    """name -> (file bytes, real MIME type, the picture a person sees in that file).

    Covers every accepted format plus the conversions that go wrong in naive pipelines.
    """
    gray = image.convert("L")
    sixteen = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)
    quantised = image.quantize(256)
    rotated_exif = image.transpose(Image.Transpose.ROTATE_90)  # stored sideways...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...with "rotate 90 CW to display", which restores `image`
    rgba = image.copy()
    rgba.putalpha(255)
    return {
        "photo.jpg": (
            encode(image, "JPEG", quality=92),
            "image/jpeg",
            Image.open(io.BytesIO(encode(image, "JPEG", quality=92))).convert("RGB"),
        ),
        "rotated.jpg": (encode(rotated_exif, "JPEG", quality=92, exif=exif), "image/jpeg", image),
        "cmyk.jpg": (encode(image.convert("CMYK"), "JPEG", quality=95), "image/jpeg", image),
        "gray.jpg": (encode(gray, "JPEG", quality=95), "image/jpeg", gray.convert("RGB")),
        "photo.png": (encode(image, "PNG"), "image/png", image),
        "rgba.png": (encode(rgba, "PNG"), "image/png", image),
        "palette.png": (encode(quantised, "PNG"), "image/png", quantised.convert("RGB")),
        "gray16.png": (encode(sixteen, "PNG"), "image/png", gray.convert("RGB")),
        "photo.gif": (encode(quantised, "GIF"), "image/gif", quantised.convert("RGB")),
        "photo.bmp": (encode(image, "BMP"), "image/bmp", image),
        "photo.tif": (encode(image, "TIFF", compression="tiff_lzw"), "image/tiff", image),
        "gray16.tif": (encode(sixteen, "TIFF"), "image/tiff", gray.convert("RGB")),
        "photo.webp": (encode(image, "WEBP", lossless=True), "image/webp", image),
        "photo.pcx": (encode(image, "PCX"), "image/x-pcx", image),
    }


def register_tiny_model(folder: Path) -> Path:
    """Write the tiny model's open_clip config and register it; returns the config file."""
    path = folder / f"{TINY_MODEL}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(path)
    return path


def save_tiny_checkpoint(path: Path, seed: int = 1234) -> Path:
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_MODEL)
    torch.save({"state_dict": model.state_dict()}, path)
    return path


@cache
def _reference_model(name: str, pretrained: str | None) -> tuple[Any, Any]:
    if pretrained is None:
        torch.manual_seed(0)  # what the worker does for CLIP_PRETRAINED=none
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    return model.eval(), preprocess


def reference_embedding(image: Image.Image, name: str, pretrained: str | None) -> np.ndarray:
    """open_clip's own answer: its transform on the PIL image, its fp32 model, L2-normalised."""
    model, preprocess = _reference_model(name, pretrained)
    with torch.inference_mode():
        features = model.encode_image(preprocess(image).unsqueeze(0))
    return F.normalize(features, dim=-1)[0].numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def upload(s3: Any, files: dict[str, bytes]) -> list[ManifestEntry]:
    entries = []
    for key, data in files.items():
        s3.put_object(Bucket=INPUT_BUCKET, Key=key, Body=data)
        etag = s3.head_object(Bucket=INPUT_BUCKET, Key=key)["ETag"].strip('"')
        mime = sniff_mime(data[:262]) or "application/octet-stream"
        entries.append(ManifestEntry(bucket=INPUT_BUCKET, key=key, size=len(data), etag=etag, mime_type=mime))
    return entries


def put_manifest(s3: Any, entries: list[ManifestEntry], shard_size: int = 1000, manifest_id: str = "m-1") -> str:
    """The job's manifest files, as the dispatcher writes them; returns its MANIFEST_URI."""
    prefix = keys.manifest_prefix("", manifest_id)
    for manifest in split(manifest_id, entries, shard_size):
        s3.put_object(Bucket=OUTPUT_BUCKET, Key=prefix + keys.manifest_shard_name(manifest.shard_index), Body=manifest.to_json())
    return keys.s3_url(OUTPUT_BUCKET, prefix)


def stored_events(s3: Any, model_id: str, prefix: str = "", bucket: str = OUTPUT_BUCKET) -> dict[str, dict[str, Any]]:
    """source key -> the CloudEvent the worker recorded for it, from every child's batch (checked by the SDK)."""
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=keys.events_prefix(prefix, model_id)):
        for item in page.get("Contents", []):
            body = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            from_json_batch(body)  # raises unless every element is a valid CloudEvent
            for event in json.loads(body):
                found[keys.parse_s3_url(event["data"]["document"]["url"])[1]] = event
    return found


def stored_vectors(s3: Any, model_id: str, prefix: str = "", bucket: str = OUTPUT_BUCKET) -> dict[str, np.ndarray]:
    """source key -> its vector, from every child's Parquet shard."""
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=keys.parquet_prefix(prefix, model_id)):
        for item in page.get("Contents", []):
            table = pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()))
            for key, vector in zip(table.column("key").to_pylist(), table.column("vector").to_pylist(), strict=True):
                found[key] = np.asarray(vector, dtype=np.float32)
    return found


def tiny_worker_config(tiny_config: Path, tiny_checkpoint: Path) -> WorkerConfig:
    """The worker's configuration for the tiny model on the CPU; a test sets the manifest."""
    return WorkerConfig(
        manifest_uri="",
        output_bucket=OUTPUT_BUCKET,
        model=TINY_MODEL,
        pretrained=str(tiny_checkpoint),
        model_config_path=str(tiny_config),
        device="cpu",
        batch_size=4,
        io_threads=4,
        decode_workers=2,
    )


# A stand-in for a codec that crashes on one crafted file: Pillow kills its own process when it
# decodes a PNG marked by `poisoned_png`. Saved as sitecustomize.py in a folder on PYTHONPATH,
# it loads into every Python process started with that environment (the worker, and its helpers).
SITECUSTOMIZE = """
import os, signal
from PIL import ImageFile

_load = ImageFile.ImageFile.load


def load(self):
    if self.info.get("gamma") == 0.31337:
        os.kill(os.getpid(), signal.SIGKILL)
    return _load(self)


ImageFile.ImageFile.load = load
"""


def poisoned_png(name: str = "coffee.png") -> bytes:
    """A real photo that kills the process loading it where SITECUSTOMIZE is installed: its mark is a
    gamma no real PNG has (a chunk the decoder still reads; it skips text chunks)."""
    marked = PngImagePlugin.PngInfo()
    marked.add(b"gAMA", (31337).to_bytes(4, "big"))
    return encode(photo(name), "PNG", pnginfo=marked)


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """A PNG's chunks in file order: (type, the whole chunk with its length and CRC)."""
    chunks, position = [], 8
    while position < len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        chunks.append((data[position + 4 : position + 8], data[position : position + 12 + length]))
        position += 12 + length
    return chunks


def png_moved(data: bytes, chunk_type: bytes, after: bytes) -> bytes:
    """The PNG with its (first) `chunk_type` chunk moved to just after the first `after` chunk."""
    chunks = png_chunks(data)
    moved = next(chunk for chunk in chunks if chunk[0] == chunk_type)
    chunks.remove(moved)
    place = next(index for index, chunk in enumerate(chunks) if chunk[0] == after) + 1
    chunks.insert(place, moved)
    return data[:8] + b"".join(whole for _, whole in chunks)
