from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_worker.config import ConfigError, WorkerConfig
from clip_worker.decoder import decode
from clip_worker.model import ModelLoadError, load
from tests.support import TINY_MODEL, cosine, encode, photo, reference_embedding, save_tiny_checkpoint


def test_a_saved_checkpoint_loads_and_its_id_follows_its_content(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model = load(TINY_MODEL, str(tiny_checkpoint), "cpu")
    assert model.dimensions == 32 and model.image_size == 64
    assert model.id.startswith(f"{TINY_MODEL}__tiny-")
    retrained = load(TINY_MODEL, str(save_tiny_checkpoint(tmp_path / "tiny.pt", seed=99)), "cpu")
    assert retrained.id != model.id  # same file name, other weights: finished work must not be reused

    picture = photo()
    vector = model.embed(model.preprocess(picture).unsqueeze(0))[0]
    assert cosine(vector, reference_embedding(picture, TINY_MODEL, str(tiny_checkpoint))) >= 0.9999


@pytest.mark.parametrize(("precision", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_a_half_precision_model_loads_and_embeds_like_open_clips_fp32_reference(
    precision: str, dtype: torch.dtype, tiny_checkpoint: Path
) -> None:
    """fp16 is how the worker loads on CUDA: open_clip keeps some parameters in fp32 while the
    convolution is half precision, so the input's dtype must come from the precision."""
    model = load(TINY_MODEL, str(tiny_checkpoint), "cpu", precision=precision)
    assert model.dtype == dtype

    picture = photo()
    vector = model.embed(model.prepare(encode(picture, "PNG"), "photo.png", 10**8).unsqueeze(0))[0]

    assert cosine(vector, reference_embedding(picture, TINY_MODEL, str(tiny_checkpoint))) >= 0.9999


def test_random_weights_warn_loudly_and_are_the_same_in_every_process(tiny_config: Path) -> None:
    with pytest.warns(UserWarning, match="RANDOM weights"):
        first = load(TINY_MODEL, "none", "cpu")
    with pytest.warns(UserWarning):
        second = load(TINY_MODEL, "none", "cpu")
    pixels = first.preprocess(photo()).unsqueeze(0)
    np.testing.assert_array_equal(first.embed(pixels), second.embed(pixels))
    assert first.id == f"{TINY_MODEL}__random"


def test_unknown_weights_fail_with_the_fix_in_the_message(tiny_config: Path) -> None:
    with pytest.raises(ModelLoadError, match="pretrained='no-such-tag'.*checkpoint file path, or `none`"):
        load(TINY_MODEL, "no-such-tag", "cpu")


def test_vit_b_32_decodes_big_jpegs_at_reduced_scale_within_cosine_0_999_of_open_clip() -> None:
    """The real architecture at its real 224 px input, where reduced-scale decoding matters."""
    with pytest.warns(UserWarning):
        model = load("ViT-B-32", "none", "cpu")
    assert (model.dimensions, model.image_size) == (512, 224)
    for name, size in [("astronaut.png", (4000, 3000)), ("coffee.png", (4000, 3000)), ("astronaut.png", (1633, 1225))]:
        jpeg = encode(photo(name).resize(size, Image.Resampling.LANCZOS), "JPEG", quality=90)
        fast = model.embed(model.preprocess(decode(jpeg, name, model.image_size, 10**9)).unsqueeze(0))[0]
        reference = reference_embedding(Image.open(io.BytesIO(jpeg)), "ViT-B-32", None)
        assert cosine(fast, reference) >= 0.999, name


def test_config_names_the_missing_or_malformed_variable() -> None:
    with pytest.raises(ConfigError, match="MANIFEST_URI and OUTPUT_BUCKET must be set"):
        WorkerConfig.from_env({})
    base = {"MANIFEST_URI": "s3://b/m.json", "OUTPUT_BUCKET": "out"}
    with pytest.raises(ConfigError, match="BATCH_SIZE='lots' is not an integer"):
        WorkerConfig.from_env({**base, "BATCH_SIZE": "lots"})
    with pytest.raises(ConfigError, match="DEVICE='tpu'"):
        WorkerConfig.from_env({**base, "DEVICE": "tpu"})
    with pytest.raises(ConfigError, match="GPU_DECODE='maybe' must be auto, on or off"):
        WorkerConfig.from_env({**base, "GPU_DECODE": "maybe"})
    assert WorkerConfig.from_env({**base, "GPU_DECODE": "off"}).gpu_decode is False
    config = WorkerConfig.from_env({**base, "AWS_BATCH_JOB_ARRAY_INDEX": "0", "CLIP_MODEL": "ViT-L-14"})
    assert (config.array_index, config.model, config.pretrained, config.device) == (0, "ViT-L-14", "openai", None)
