"""The open_clip model: loading it offline, and turning batches of pictures into unit vectors."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from clip_shared.keys import RANDOM_WEIGHTS, model_id
from clip_worker import pixels
from clip_worker.sandbox import Sandbox
from clip_worker.transform import Preprocess


class ModelLoadError(RuntimeError):
    """The model or its weights cannot be loaded; the message says which and what to do."""


@dataclass
class ClipModel:
    name: str
    pretrained: str
    #: The model and weights as one path segment of every output key.
    id: str
    dimensions: int
    device: torch.device
    #: What the network takes its pixels in: open_clip's input dtype for the precision it was built
    #: with (half precision on CUDA), which is not the dtype of every parameter (fp16 keeps some in fp32).
    dtype: torch.dtype
    #: open_clip's own evaluation transform for this model: PIL image -> normalised CHW tensor.
    preprocess: Callable[[Image.Image], torch.Tensor]
    #: The shortest side the preprocessing resizes to; decoding may stop at this size.
    image_size: int
    #: open_clip's CLIP (open_clip ships no type information, hence Any).
    network: Any
    #: open_clip's tokenizer for this model: list of texts -> token ids of its context length.
    tokenizer: Callable[[list[str]], torch.Tensor]

    @cached_property
    def bounded_preprocess(self) -> Preprocess:
        """`preprocess` computing only what its crop keeps: the same pixels at a cost bounded by the input size."""
        return Preprocess(self.preprocess)

    def prepare(self, data: bytes, url: str, max_pixels: int, sandbox: Sandbox | None = None) -> torch.Tensor:
        """Image bytes -> this model's input, on the CPU (`model_input`): decoded in one of `sandbox`'s
        processes under its budget when given, as the worker and the query API always do.
        Raises DocumentError naming `url` when the bytes are not an image it can embed, or cost too much."""
        return model_input(data, url, self.bounded_preprocess, self.image_size, max_pixels, sandbox)

    def embed(self, pixels: torch.Tensor) -> np.ndarray:
        """A batch of preprocessed images -> float32 L2-normalised vectors, one row per image."""
        return self.encode(pixels).cpu().numpy()

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Like `embed`, but the vectors stay on the device: on CUDA this returns as soon as the work
        is queued, so the caller can prepare the next batch while the GPU runs this one."""
        with torch.inference_mode():
            features = self.network.encode_image(pixels.to(self.device, self.dtype, non_blocking=True))
            return F.normalize(features.float(), dim=-1)

    @property
    def context_length(self) -> int:
        """The most tokens the text tower reads, start and end tokens included."""
        return int(getattr(self.tokenizer, "context_length", None) or 77)

    def text_fits(self, text: str) -> bool:
        """Whether the text tower sees all of `text`: open_clip's tokenizers silently cut the rest."""
        if getattr(self.tokenizer, "sot_token_id", None) is not None:
            # open_clip's own BPE tokenizer: the text's tokens plus start and end must fit.
            return len(self.tokenizer.encode(text)) + 2 <= self.context_length  # type: ignore[attr-defined]  # the BPE tokenizer has encode; the Callable type does not say so
        # Hugging Face tokenizers pad with zeros: a text that reaches the last position may have been cut.
        return int(self.tokenizer([text])[0, -1]) == 0

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Texts -> float32 L2-normalised vectors in the same space as the images."""
        with torch.inference_mode():
            features = self.network.encode_text(self.tokenizer(texts).to(self.device))
            return F.normalize(features.float(), dim=-1).cpu().numpy()


def model_input(
    data: bytes, url: str, preprocess: Preprocess, min_side: int, max_pixels: int, sandbox: Sandbox | None = None
) -> torch.Tensor:
    """Image bytes -> a model's input: Pillow decodes and open_clip's own transform crops
    (pixels.model_pixels), in one of `sandbox`'s processes when given, else here; this process
    normalises (Preprocess.finish). The one CPU path from bytes to pixels, for the worker and the query API."""
    arguments = (data, url, preprocess.step, min_side, max_pixels)
    made = pixels.model_pixels(*arguments) if sandbox is None else sandbox.run(url, pixels.model_pixels, *arguments)
    return preprocess.finish(made)


def default_batch_size(device: torch.device) -> int:
    return 256 if device.type == "cuda" else 32


def _cuda_unusable_reason() -> str:
    """torch's own words for why CUDA is unavailable (no driver, a driver too old for its CUDA...)."""
    try:
        torch.cuda.init()
    except Exception as exc:  # noqa: BLE001 - any error torch raises is the reason to report
        return f"{type(exc).__name__}: {exc}"
    return "torch.cuda.is_available() is False"


def load(
    name: str,
    pretrained: str,
    device: str | None = None,
    cache_dir: str | None = None,
    model_config_path: str | None = None,
    precision: str | None = None,
) -> ClipModel:
    """`precision` is open_clip's (`fp32`, `fp16`, `bf16`...); None: fp16 on CUDA, fp32 on the CPU."""
    if model_config_path:
        open_clip.add_model_config(model_config_path)
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        # Asked for the GPU (the job definition's DEVICE=cuda): a driver this torch cannot use must
        # fail the job, not leave it embedding on the CPU for hours.
        raise ModelLoadError(f"DEVICE={device} but CUDA is unusable here: {_cuda_unusable_reason()}")
    precision = precision or ("fp16" if torch_device.type == "cuda" else "fp32")
    random_weights = pretrained.lower() == RANDOM_WEIGHTS
    if random_weights:
        warnings.warn(
            f"CLIP_PRETRAINED=none: {name} has RANDOM weights; its vectors are meaningless (smoke tests only)",
            stacklevel=2,
        )
        # Every array child must build the same random model, or their vectors would not compare.
        torch.manual_seed(0)
    try:
        network, _, preprocess = open_clip.create_model_and_transforms(
            name,
            pretrained=None if random_weights else pretrained,
            device=torch_device,
            precision=precision,
            cache_dir=cache_dir,
        )
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (
            "the weights are not in the image's cache (CLIP_CACHE_DIR); rebuild the image with this model baked in"
            if offline
            else "pass a known open_clip tag (open_clip.list_pretrained()), a checkpoint file path, or `none`"
        )
        raise ModelLoadError(f"cannot load {name} with pretrained={pretrained!r}: {exc}; {hint}") from exc
    network.eval()
    size = open_clip.get_model_preprocess_cfg(network)["size"]
    image_size = min(size) if isinstance(size, (tuple, list)) else int(size)
    with torch.inference_mode():
        # A real forward pass tells the output width of any architecture, and warms the kernels up.
        probe = torch.zeros(
            1, 3, image_size, image_size, device=torch_device, dtype=open_clip.get_input_dtype(precision) or torch.float32
        )
        dimensions = int(network.encode_image(probe).shape[-1])
    return ClipModel(
        name=name,
        pretrained=pretrained,
        id=model_id(name, pretrained),
        dimensions=dimensions,
        device=torch_device,
        dtype=probe.dtype,
        preprocess=preprocess,
        image_size=image_size,
        network=network,
        tokenizer=open_clip.get_tokenizer(name, cache_dir=cache_dir),
    )
