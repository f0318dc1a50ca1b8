"""Zero-shot keywords: a label set embedded once with the text tower, and the labels nearest each image.

This is CLIP's zero-shot classification: each label becomes a prompt ("a photo of a dog"), the
prompt's text vector is compared with the image vector by cosine, and a softmax of the cosines,
sharpened by the model's learned temperature, says how likely each label is against the rest of
the set. Shared by the worker (keywords in every event) and the query API (`/classify`).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import numpy as np
from botocore.exceptions import BotoCoreError, ClientError

from clip_shared.keys import parse_s3_url

if TYPE_CHECKING:  # the model module imports torch; ranking stored vectors needs only numpy
    from clip_worker.model import ClipModel

PROMPT = "a photo of a {}"
#: CLIP clamps its learned temperature to this while training; the softmax uses no more.
MAX_LOGIT_SCALE = 100.0

#: COCO's 80 object classes (a few renamed to read well in the prompt: "television", "computer
#: mouse"), then people, animals, scenes, nature, food and everyday things, and the pictures that
#: fill real buckets besides photos (screenshots, documents, diagrams).
DEFAULT_LABELS: tuple[str, ...] = (
    # COCO
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "necktie",
    "suitcase",
    "frisbee",
    "pair of skis",
    "snowboard",
    "ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "television",
    "laptop",
    "computer mouse",
    "remote control",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair dryer",
    "toothbrush",
    # people
    "man",
    "woman",
    "child",
    "baby",
    "crowd of people",
    # animals
    "fish",
    "rabbit",
    "mouse",
    "squirrel",
    "deer",
    "fox",
    "lion",
    "tiger",
    "monkey",
    "gorilla",
    "panda",
    "pig",
    "goat",
    "chicken",
    "duck",
    "owl",
    "parrot",
    "penguin",
    "butterfly",
    "bee",
    "spider",
    "snake",
    "turtle",
    "frog",
    "crab",
    "shark",
    "whale",
    "dolphin",
    "insect",
    # scenes
    "beach",
    "mountain",
    "forest",
    "desert",
    "lake",
    "river",
    "ocean",
    "waterfall",
    "cave",
    "island",
    "field",
    "garden",
    "park",
    "city street",
    "city skyline",
    "highway",
    "road",
    "bridge",
    "skyscraper",
    "house",
    "church",
    "castle",
    "kitchen",
    "living room",
    "bedroom",
    "bathroom",
    "office",
    "restaurant",
    "cafe",
    "supermarket",
    "shop",
    "library",
    "museum",
    "stadium",
    "airport",
    "train station",
    "harbor",
    "farm",
    "playground",
    "swimming pool",
    "parking lot",
    "construction site",
    "gym",
    "concert",
    "wedding",
    "party",
    # nature and weather
    "tree",
    "flower",
    "grass",
    "rock",
    "cloud",
    "sunset",
    "night sky",
    "snow",
    "rain",
    "rainbow",
    "fire",
    "fireworks",
    "moon",
    # food and drink
    "bread",
    "cheese",
    "salad",
    "soup",
    "hamburger",
    "pasta",
    "rice",
    "sushi",
    "fruit",
    "vegetables",
    "coffee",
    "tea",
    "beer",
    "wine",
    "ice cream",
    "cookie",
    "chocolate",
    "french fries",
    # vehicles
    "helicopter",
    "tractor",
    "ship",
    "sailboat",
    "van",
    "taxi",
    "ambulance",
    "fire truck",
    "police car",
    # things
    "guitar",
    "piano",
    "camera",
    "computer",
    "watch",
    "glasses",
    "sunglasses",
    "hat",
    "shoe",
    "shirt",
    "dress",
    "jacket",
    "lamp",
    "mirror",
    "window",
    "door",
    "staircase",
    "table",
    "desk",
    "bookshelf",
    "tent",
    "painting",
    "sculpture",
    "statue",
    "poster",
    "flag",
    "map",
    "toy",
    "christmas tree",
    # pictures that are not photos of a scene
    "screenshot",
    "document",
    "receipt",
    "diagram",
    "chart",
    "logo",
    "drawing",
    "cartoon",
)


def logit_scale(model: ClipModel) -> float:
    """The model's learned softmax temperature, exp(network.logit_scale), at most MAX_LOGIT_SCALE."""
    learned = getattr(model.network, "logit_scale", None)
    return MAX_LOGIT_SCALE if learned is None else min(math.exp(learned.detach().item()), MAX_LOGIT_SCALE)


class LabelError(ValueError):
    """A label set that cannot be read or holds no labels; the message names its source."""


def read_labels(spec: str, s3: Any | None = None) -> list[str]:
    """The labels `spec` names: `default` (DEFAULT_LABELS), the s3:// URI of a UTF-8 text file with
    one label per line (blank lines and `#` comments skipped), or labels separated by commas.
    Duplicates are dropped, the first kept. `s3` reads the file (a default client when None)."""
    source = spec.strip()
    if source.lower() == "default":
        return list(DEFAULT_LABELS)
    if source.startswith("s3://"):
        lines = (line.strip() for line in _read_text(source, s3).splitlines())
        labels = [line for line in lines if line and not line.startswith("#")]
    else:
        labels = [part.strip() for part in source.split(",") if part.strip()]
    if not labels:
        raise LabelError(
            f"the label set {spec!r} holds no labels: give `default`, labels separated by commas, "
            "or the s3:// URI of a text file with one label per line"
        )
    return list(dict.fromkeys(labels))


def _read_text(uri: str, s3: Any | None) -> str:
    try:
        bucket, key = parse_s3_url(uri)
        body = (s3 or boto3.client("s3")).get_object(Bucket=bucket, Key=key)["Body"].read()
        # utf-8-sig: the byte-order mark some editors write must not become part of the first label.
        return body.decode("utf-8-sig")
    except (ClientError, BotoCoreError, ValueError) as exc:  # ValueError: a malformed URI, or not UTF-8
        raise LabelError(f"cannot read the label set {uri}: {exc}") from exc


@dataclass(frozen=True)
class Label:
    """One label of a set, as it scores against one image."""

    label: str
    #: Cosine similarity between the image vector and the prompt's text vector.
    score: float
    #: Softmax over all the set's labels of logit_scale * cosine: CLIP's zero-shot probability.
    probability: float


@dataclass(frozen=True)
class LabelSet:
    labels: list[str]
    #: (len(labels), dimensions) float32 unit text vectors of PROMPT.format(label), row for row.
    vectors: np.ndarray
    #: The model's learned softmax temperature, exp(network.logit_scale), at most MAX_LOGIT_SCALE.
    logit_scale: float

    @classmethod
    def embed(cls, model: ClipModel, labels: Sequence[str], batch_size: int = 256) -> LabelSet:
        """Embed each label's prompt with the model's text tower, `batch_size` prompts at a time."""
        labels = list(labels)
        if not labels:
            raise LabelError("a label set needs at least one label")
        prompts = [PROMPT.format(label) for label in labels]
        vectors = np.concatenate(
            [model.embed_texts(prompts[start : start + batch_size]) for start in range(0, len(prompts), batch_size)]
        )
        return cls(labels, vectors, logit_scale(model))

    @classmethod
    def cached(cls, model: ClipModel, labels: Sequence[str], cache_dir: str | None) -> LabelSet:
        """`embed`, unless `cache_dir` already holds this model's vectors of exactly these labels.

        The text tower is slow on a CPU (the default set takes ViT-B-32 about 15 s on 2 vCPUs), so
        the images bake the default set's vectors next to the weights, and a query API's first
        /classify costs a file read. Where the directory is read-only (a Lambda image) the vectors
        are only computed.
        """
        labels = list(labels)
        if cache_dir is None:
            return cls.embed(model, labels)
        path = baked_path(model.id, labels, cache_dir)
        if path.is_file():
            return cls(labels, np.load(path), logit_scale(model))
        computed = cls.embed(model, labels)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Written aside and renamed, so a concurrent reader never loads half a file.
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            with partial.open("wb") as file:
                np.save(file, computed.vectors)
            partial.replace(path)
        except OSError:
            pass
        return computed

    def top(self, vectors: np.ndarray, k: int) -> list[list[Label]]:
        """For each row of `vectors` (m, dimensions), unit image vectors of the same model: its `k`
        best labels, best first (all of them when the set has fewer)."""
        if k < 1:
            raise ValueError(f"k={k} must be at least 1")
        scores = np.asarray(vectors, dtype=np.float32) @ self.vectors.T  # unit vectors: cosines, (m, n)
        logits = self.logit_scale * scores
        # Subtracting each row's maximum keeps exp() finite and leaves the softmax unchanged.
        weights = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = weights / weights.sum(axis=1, keepdims=True)
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return [
            [Label(self.labels[index], float(row_scores[index]), float(row_probabilities[index])) for index in row]
            for row, row_scores, row_probabilities in zip(best, scores, probabilities, strict=True)
        ]


def baked_path(model_id: str, labels: Sequence[str], cache_dir: str) -> Path:
    digest = hashlib.sha256("\n".join([model_id, PROMPT, *labels]).encode()).hexdigest()[:16]
    return Path(cache_dir) / "label-vectors" / f"{digest}.npy"


def baked_vectors(model_id: str, cache_dir: str | None, labels: Sequence[str] = DEFAULT_LABELS) -> np.ndarray | None:
    """The prompt vectors an image baked for this model's label set (`LabelSet.cached`), without
    loading the model; None where none were baked. The vector store probes its text -> image recall
    with them (clip_store.recall)."""
    if cache_dir is None:
        return None
    path = baked_path(model_id, list(labels), cache_dir)
    return np.load(path) if path.is_file() else None
