"""The second stage, on the main thread: batches of prepared images -> unit vectors (and keywords)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch

from clip_shared.events import DocumentError, Keywords
from clip_worker import device_decode
from clip_worker.labels import PROMPT, LabelSet
from clip_worker.log import logger
from clip_worker.model import ClipModel
from clip_worker.prepare import Failed, Prepared, unexpected
from clip_worker.sandbox import Sandbox


class Embedder:
    """Batches of Prepared -> vectors, decoding the batch's JPEGs on the device first.

    A batch's vectors are read back only once the next batch is queued: on CUDA the model runs
    asynchronously, so the GPU embeds batch N while this thread decodes and crops batch N+1, on a
    stream of its own (device_decode.DecodeStream says why it must be another stream).
    """

    def __init__(
        self,
        model: ClipModel,
        max_pixels: int,
        transform: device_decode.TensorTransform | None,
        sandbox: Sandbox,
        held: device_decode.HeldBytes,
    ) -> None:
        self._model = model
        self._max_pixels = max_pixels
        self._transform = transform
        self._sandbox = sandbox
        self._held = held
        self._stream = device_decode.DecodeStream(model.device)
        self._queued: tuple[list[Prepared], torch.Tensor] | None = None

    def submit(self, batch: list[Prepared]) -> tuple[list[Failed], list[tuple[Prepared, np.ndarray]]]:
        """Queue `batch`; returns its images that failed, and the vectors of the batch queued before it."""
        jpegs = [item.image for item in batch if isinstance(item.image, device_decode.Jpeg)]
        on_device = iter(device_decode.preprocess(jpegs, self._transform, self._stream) if jpegs and self._transform else ())
        try:
            return self._submit(batch, on_device)
        finally:
            # Decoded on the device, or by the CPU path when the device gave up: their bytes can go.
            self._held.give(sum(jpeg.size for jpeg in jpegs))

    def _submit(
        self, batch: list[Prepared], on_device: Iterator[device_decode.Outcome]
    ) -> tuple[list[Failed], list[tuple[Prepared, np.ndarray]]]:
        kept: list[Prepared] = []
        inputs: list[torch.Tensor] = []
        failed: list[Failed] = []
        for item in batch:
            outcome = item.image if isinstance(item.image, torch.Tensor) else next(on_device)
            if isinstance(outcome, RuntimeError):
                # The device gave up on it: the CPU path decodes it, or says what is wrong with it.
                logger.info(
                    "decoding on the CPU instead", extra={"url": item.entry.url, "reason": f"{type(outcome).__name__}: {outcome}"}
                )
                try:
                    outcome = self._model.prepare(
                        item.image.data.numpy().tobytes(), item.entry.url, self._max_pixels, self._sandbox
                    )
                except DocumentError as error:
                    failed.append(Failed(item.entry, error))
                    continue
                except Exception as exc:  # noqa: BLE001 - as in prepare: one image never fails the batch
                    failed.append(unexpected(item.entry, exc))
                    continue
            # Kept until the next batch is queued: without the JPEG's bytes, which HeldBytes counts no more.
            kept.append(replace(item, image=outcome))
            inputs.append(outcome.to(self._model.device, self._model.dtype, non_blocking=True))
        done = self.finish()
        if kept:
            self._queued = (kept, self._model.encode(torch.stack(inputs)))
        return failed, done

    def finish(self) -> list[tuple[Prepared, np.ndarray]]:
        """The vectors of the last batch queued (waiting for the device), and nothing left queued."""
        if self._queued is None:
            return []
        items, features = self._queued
        self._queued = None
        return list(zip(items, features.cpu().numpy(), strict=True))


def decode_on_device(device: torch.device, gpu_decode: bool | None) -> bool:
    """GPU_DECODE: on (True), off (False), or auto (None): on a CUDA GPU with a hardware JPEG decoder.

    Without one, torchvision's nvJPEG decodes each image's Huffman stage on the CPU, one at a time
    under a lock, on the thread that feeds the GPU; Pillow's reduced-scale decoding in the prepare
    threads does less work for big photos and uses every vCPU (docs/gpu.md).
    """
    if gpu_decode is not None:
        return gpu_decode
    return device.type == "cuda" and device_decode.hardware_jpeg_decoder(device)


def device_transform(model: ClipModel, gpu_decode: bool | None) -> device_decode.TensorTransform | None:
    """The tensor transform when JPEGs are to be decoded on the model's device, else None."""
    if not decode_on_device(model.device, gpu_decode):
        if model.device.type == "cuda":
            logger.info(
                "decoding JPEGs with Pillow on the CPU",
                extra={
                    "reason": "GPU_DECODE=off"
                    if gpu_decode is False
                    else "this GPU has no hardware JPEG decoder; GPU_DECODE=on would use nvJPEG anyway"
                },
            )
        return None
    try:
        return device_decode.TensorTransform.for_model(model)
    except device_decode.UnsupportedTransform as exc:
        logger.warning("decoding on the CPU: this model's preprocessing has no tensor equivalent", extra={"reason": str(exc)})
        return None


def keywords(label_set: LabelSet | None, vectors: list[np.ndarray], k: int) -> list[Keywords | None]:
    """Each image's zero-shot keywords, the whole batch ranked in one matrix product; None when off."""
    if label_set is None or not vectors:
        return [None] * len(vectors)
    return [Keywords(ranked, PROMPT, len(label_set.labels)) for ranked in label_set.top(np.stack(vectors), k)]
