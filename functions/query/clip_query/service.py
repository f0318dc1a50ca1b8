"""The query API's work, on the worker's own code: texts and images to vectors (ClipModel), zero-shot
labels (clip_worker.labels) and the nearest stored images (clip_worker.index)."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from aws_lambda_powertools import Logger

from clip_query.config import QueryConfig
from clip_query.inputs import ApiError, invalid, unsupported_type
from clip_shared import keys
from clip_shared.events import DocumentError, ErrorCode
from clip_shared.mime import SNIFF_BYTES, is_accepted, sniff_mime
from clip_worker.index import Match, VectorIndex, list_shards, read_shard
from clip_worker.labels import PROMPT, Label, LabelSet, read_labels
from clip_worker.model import ClipModel, load

logger = Logger(service="clip-query")


class LiveIndex:
    """One model's stored vectors, read once per warm container and reloaded when the shards change.

    The shard listing is checked at most every `refresh_s` seconds, and only new or rewritten
    shards are downloaded: a container that has served a while holds every shard it has seen.
    """

    def __init__(self, s3: Any, bucket: str, prefix: str, model_id: str, refresh_s: float) -> None:
        self._s3 = s3
        self._bucket = bucket
        self._prefix = prefix
        self._model_id = model_id
        self._refresh_s = refresh_s
        self._lock = threading.Lock()
        self._tables: dict[tuple[str, str], pa.Table] = {}
        self._index = VectorIndex.from_tables([])
        self._checked_at: float | None = None

    def loaded(self) -> int:
        """How many vectors are loaded now, without looking for new shards."""
        return len(self._index)

    def current(self) -> VectorIndex:
        with self._lock:
            now = time.monotonic()
            if self._checked_at is not None and now - self._checked_at < self._refresh_s:
                return self._index
            self._checked_at = now
            shards = [(item["Key"], item["ETag"]) for item in list_shards(self._s3, self._bucket, self._prefix, self._model_id)]
            if shards != list(self._tables):
                started = time.monotonic()
                self._tables = {
                    shard: self._tables[shard] if shard in self._tables else read_shard(self._s3, self._bucket, shard[0])
                    for shard in shards
                }
                self._index = VectorIndex.from_tables(self._tables.values())
                logger.info(
                    "vector index loaded",
                    extra={"shards": len(shards), "vectors": len(self._index), "seconds": round(time.monotonic() - started, 3)},
                )
            return self._index


def image_error(field: str, error: DocumentError, max_pixels: int) -> ApiError:
    if error.code is ErrorCode.TOO_MANY_PIXELS:
        return ApiError(400, "too-many-pixels", error.message, field, limit=max_pixels)
    if error.code is ErrorCode.UNSUPPORTED_TYPE:
        return unsupported_type(field, None)
    return ApiError(400, str(error.code), error.message, field)


class QueryService:
    def __init__(self, config: QueryConfig, s3: Any, model: ClipModel | None = None) -> None:
        self.config = config
        self.s3 = s3
        self.model = model or load(
            config.model, config.pretrained, cache_dir=config.cache_dir, model_config_path=config.model_config_path
        )
        self.index = LiveIndex(s3, config.output_bucket, config.output_prefix, self.model.id, config.index_refresh_s)
        self._default_labels: LabelSet | None = None
        self._labels_lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"model": self.model.name, "pretrained": self.model.pretrained, "dimensions": self.model.dimensions}

    def check_text(self, field: str, text: str, truncate: bool) -> None:
        if not text.strip():
            raise invalid(f"{field} is empty", field)
        if len(text) > self.config.max_text_chars:
            raise ApiError(
                400,
                "text-too-long",
                f"{field} has {len(text)} characters, over the limit of {self.config.max_text_chars}",
                field,
                limit=self.config.max_text_chars,
                unit="characters",
            )
        if not truncate and not self.model.text_fits(text):
            raise ApiError(
                400,
                "text-too-long",
                f"{field} is longer than {self.model.name}'s {self.model.context_length}-token context; shorten it, "
                "or send truncate=true to embed only its beginning",
                field,
                limit=self.model.context_length,
                unit="tokens",
            )

    def text_vectors(self, texts: dict[str, str], truncate: bool) -> dict[str, np.ndarray]:
        for field, text in texts.items():
            self.check_text(field, text, truncate)
        return dict(zip(texts, self.model.embed_texts(list(texts.values())))) if texts else {}

    def image_vectors(self, images: dict[str, bytes]) -> dict[str, np.ndarray]:
        """The worker's own path: the real type from the bytes, then ClipModel.prepare and embed."""
        pixels = []
        for field, data in images.items():
            found = sniff_mime(data[:SNIFF_BYTES])
            if not is_accepted(found):
                raise unsupported_type(field, found)
            try:
                pixels.append(self.model.prepare(data, field, self.config.max_image_pixels))
            except DocumentError as error:
                raise image_error(field, error, self.config.max_image_pixels) from None
        return dict(zip(images, self.model.embed(torch.stack(pixels)))) if pixels else {}

    def label_set(self, labels: list[str] | None) -> LabelSet:
        """The request's labels, or the configured set, embedded once per container."""
        if labels is not None:
            for label in labels:
                self.check_text("labels", PROMPT.format(label), truncate=False)
            return LabelSet.embed(self.model, labels)
        with self._labels_lock:
            if self._default_labels is None:
                self._default_labels = LabelSet.cached(self.model, read_labels(self.config.labels, self.s3), self.config.cache_dir)
            return self._default_labels

    def classify(self, images: dict[str, np.ndarray], labels: LabelSet, k: int) -> dict[str, list[Label]]:
        """Each image's k best labels; the API has made sure there is at least one image."""
        return dict(zip(images, labels.top(np.stack(list(images.values())), k)))

    def search(self, vector: np.ndarray, k: int) -> tuple[list[Match], int]:
        index = self.index.current()
        return index.nearest(vector, k), len(index)

    def preview(self, url: str) -> str | None:
        """A short-lived https URL of a stored image, for pages that show results."""
        try:
            bucket, key = keys.parse_s3_url(url)
        except ValueError:
            return None
        return self.s3.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=self.config.preview_url_s
        )
