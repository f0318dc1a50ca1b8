"""The query API's work, on the worker's own code: texts and images to vectors (ClipModel), zero-shot
labels (clip_worker.labels) and the nearest stored images (clip_store, the vector store).

It knows nothing of HTTP: a refusal is a QueryError with a stable code, which api.py turns into a status.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from aws_lambda_powertools import Logger

from clip_query.config import QueryConfig
from clip_query.errors import Code, QueryError, image_error, invalid, shown, unsupported_type
from clip_shared import keys
from clip_shared.events import DocumentError, ErrorCode
from clip_shared.mime import SNIFF_BYTES, is_accepted, sniff_mime
from clip_store import Match, SearchSettings, StorageSettings, VectorStore, store_uri
from clip_worker import pixels
from clip_worker.labels import PROMPT, Label, LabelSet, read_labels
from clip_worker.model import ClipModel, load
from clip_worker.sandbox import Sandbox

logger = Logger(service="clip-query")
T = TypeVar("T")


@dataclass(frozen=True)
class Vectors:
    texts: dict[str, np.ndarray]
    images: dict[str, np.ndarray]


@dataclass(frozen=True)
class Classified:
    #: Each image's best labels, best first.
    images: dict[str, list[Label]]
    #: `request`, or the configured set's name (CLIP_LABELS).
    label_set: str
    labels_compared: int


class QueryService:
    """Every check before any work: a request over a limit costs its parsing, a look at its image
    headers and the tokenizing of its texts, never a decode or a forward pass. The look and the
    decoding run in `sandbox`'s processes, under the request's budget (DECODE_CPU_SECONDS...)."""

    def __init__(
        self,
        config: QueryConfig,
        s3: Any,
        model: ClipModel | None = None,
        storage: StorageSettings | None = None,
        sandbox: Sandbox | None = None,
    ) -> None:
        self.config = config
        self.s3 = s3
        # Started first: its processes import while this one loads the model.
        self.sandbox = sandbox or Sandbox(config.decode_limits, config.decode_workers)
        self.model = model or load(
            config.model, config.pretrained, cache_dir=config.cache_dir, model_config_path=config.model_config_path
        )
        # Opened on the first search; it reads the index's parts a query needs, never the whole table.
        self.store = VectorStore(
            store_uri(config.output_bucket, config.output_prefix, self.model.id),
            settings=storage,
            refresh_s=config.index_refresh_s,
            search=SearchSettings(nprobes=config.search_nprobes or None),
            index_cache_bytes=config.search_index_cache_mb * 2**20,
        )
        self._searched = False
        self._default_labels: LabelSet | None = None
        self._labels_lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"model": self.model.name, "pretrained": self.model.pretrained, "dimensions": self.model.dimensions}

    def check_text(self, field: str, text: str, truncate: bool) -> None:
        if not text.strip():
            raise invalid(f"{shown(field)} is empty", field)
        if len(text) > self.config.max_text_chars:
            raise QueryError(
                Code.TEXT_TOO_LONG,
                f"{shown(field)} has {len(text)} characters, over the limit of {self.config.max_text_chars}",
                field,
                limit=self.config.max_text_chars,
                unit="characters",
            )
        if not truncate and not self.model.text_fits(text):
            raise QueryError(
                Code.TEXT_TOO_LONG,
                f"{shown(field)} is longer than {self.model.name}'s {self.model.context_length}-token context; shorten it, "
                "or send truncate=true to embed only its beginning",
                field,
                limit=self.model.context_length,
                unit="tokens",
            )

    def check_images(self, images: dict[str, bytes]) -> None:
        """The real type of each image from its bytes, and its pixels from its header: each within
        MAX_IMAGE_PIXELS, all of them together within MAX_REQUEST_PIXELS."""
        for field, data in images.items():
            found = sniff_mime(data[:SNIFF_BYTES])
            if not is_accepted(found):
                raise unsupported_type(field, found)
        sizes = self._in_sandbox(pixels.declared_sizes, list(images.values()), self.config.max_image_pixels) if images else []
        total = 0
        for field, size in zip(images, sizes, strict=True):
            if size is None:
                continue
            width, height = size
            if width * height > self.config.max_image_pixels:
                raise QueryError(
                    Code.TOO_MANY_PIXELS,
                    f"{shown(field)} is {width}x{height} = {width * height} pixels, over the limit of "
                    f"{self.config.max_image_pixels} an image",
                    field,
                    limit=self.config.max_image_pixels,
                )
            total += width * height
            if total > self.config.max_request_pixels:
                raise QueryError(
                    Code.TOO_MANY_PIXELS,
                    f"the images up to {shown(field)} hold {total} pixels, over the limit of "
                    f"{self.config.max_request_pixels} a request",
                    field,
                    limit=self.config.max_request_pixels,
                )

    def vectors(self, texts: dict[str, str], images: dict[str, bytes], truncate: bool) -> Vectors:
        for field, text in texts.items():
            self.check_text(field, text, truncate)
        self.check_images(images)
        return Vectors(self._text_vectors(texts), self._image_vectors(images))

    def similarity(self, vectors: Vectors) -> dict[str, dict[str, float]]:
        """The cosine of every text with every image: unit vectors, so their dot product."""
        return {
            text: {image: float(text_vector @ image_vector) for image, image_vector in vectors.images.items()}
            for text, text_vector in vectors.texts.items()
        }

    def classify(self, images: dict[str, bytes], labels: list[str] | None, top_k: int | None) -> Classified:
        """Each image's `top_k` best of the request's labels, or of the configured set."""
        self.check_images(images)
        for label in labels or ():
            self.check_text("labels", PROMPT.format(label), truncate=False)
        vectors = self._image_vectors(images)
        label_set = self.label_set(labels)
        k = min(top_k or self.config.top_k, len(label_set.labels))
        ranked = dict(zip(vectors, label_set.top(np.stack(list(vectors.values())), k), strict=True))
        return Classified(ranked, "request" if labels else self.config.labels, len(label_set.labels))

    def label_set(self, labels: list[str] | None) -> LabelSet:
        """The request's labels, or the configured set, embedded once per container."""
        if labels is not None:
            return LabelSet.embed(self.model, labels)
        with self._labels_lock:
            if self._default_labels is None:
                self._default_labels = LabelSet.cached(
                    self.model, read_labels(self.config.labels, self.s3), self.config.cache_dir
                )
            return self._default_labels

    def search(self, vector: np.ndarray, k: int) -> tuple[list[Match], int]:
        first = not self._searched
        started = time.monotonic()
        matches, indexed = self.store.nearest(vector, k), self.store.count()
        if first:
            self._searched = True
            # What a cold container's first search paid to open the store: the figure to watch as it grows.
            logger.info(
                "vector store opened",
                extra={"store": self.store.uri, "indexed": indexed, "seconds": round(time.monotonic() - started, 3)},
            )
        return matches, indexed

    def search_in_use(self) -> dict[str, Any] | None:
        """The settings /search uses (SEARCH_NPROBES wins over those measured) and the recall measured
        (models.SearchInUse); None while the store holds nothing."""
        found = self.store.search_in_use()
        if found is None:
            return None
        nprobes, refine_factor, tuning = found
        used = {"nprobes": nprobes, "refine_factor": refine_factor}
        if tuning is None:
            return used
        measured = {"recall": tuning.recall, "k": tuning.k, "target": tuning.target, "reached": tuning.reached}
        return {**used, **measured, "measured_rows": tuning.rows, "measured_at": tuning.measured_at}

    def preview(self, url: str) -> str | None:
        """A short-lived https URL of a stored image, for pages that show results."""
        try:
            bucket, key = keys.parse_s3_url(url)
        except ValueError:
            return None
        return self.s3.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=self.config.preview_url_s
        )

    def _text_vectors(self, texts: dict[str, str]) -> dict[str, np.ndarray]:
        return dict(zip(texts, self.model.embed_texts(list(texts.values())), strict=True)) if texts else {}

    def _image_vectors(self, images: dict[str, bytes]) -> dict[str, np.ndarray]:
        """The worker's own path (model_input: decoded and cropped in a decoding process, normalised here)
        and embed, on images check_images has passed."""
        if not images:
            return {}
        named = [(shown(field), data) for field, data in images.items()]
        preprocess = self.model.bounded_preprocess
        found = self._in_sandbox(
            pixels.model_pixels_each, named, preprocess.step, self.model.image_size, self.config.max_image_pixels
        )
        for field, outcome in zip(images, found, strict=True):
            if isinstance(outcome, DocumentError):
                raise image_error(field, outcome, self.config.max_image_pixels)
        inputs = [preprocess.finish(outcome) for outcome in found if not isinstance(outcome, DocumentError)]
        return dict(zip(images, self.model.embed(torch.stack(inputs)), strict=True))

    def _in_sandbox(self, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` in a decoding process; over the budget, the request is refused as too-costly."""
        try:
            return self.sandbox.run("the request's images", function, *args)
        except DocumentError as error:
            # The request's images together: no one field is at fault.
            code = Code.TOO_COSTLY if error.code is ErrorCode.TOO_COSTLY else Code.CORRUPT_IMAGE
            raise QueryError(code, error.message) from None
