"""Zero-shot labels: reading a label set, embedding it with the text tower, ranking image vectors by it."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from clip_worker.config import ConfigError, WorkerConfig
from clip_worker.labels import DEFAULT_LABELS, LabelError, LabelSet, read_labels
from clip_worker.model import ClipModel, load
from tests.conftest import OUTPUT_BUCKET
from tests.support import TINY_MODEL, cosine, photo

LABELS = ["cat", "dog", "red bicycle", "cup of coffee", "astronaut", "mountain lake"]


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> ClipModel:
    return load(TINY_MODEL, str(tiny_checkpoint), "cpu")


def test_a_comma_separated_list_is_stripped_and_deduplicated() -> None:
    assert read_labels(" cat, dog ,, cat , red bicycle,") == ["cat", "dog", "red bicycle"]


def test_default_is_a_built_in_set_of_common_objects_and_scenes() -> None:
    assert read_labels("Default") == read_labels(" default ") == list(DEFAULT_LABELS)
    assert 150 <= len(DEFAULT_LABELS) <= 250
    assert len(set(DEFAULT_LABELS)) == len(DEFAULT_LABELS)
    assert all(label and label == label.strip().lower() for label in DEFAULT_LABELS)
    assert {"person", "dog", "pizza", "beach", "kitchen", "screenshot"} <= set(DEFAULT_LABELS)


def test_an_s3_file_gives_one_label_per_line_without_blanks_comments_or_duplicates(s3: Any) -> None:
    # The byte-order mark some editors write must not turn the first comment into a label.
    body = "\ufeff# our catalogue\ncat\n\n  dog  \n# seasonal\ncat\ncrème brûlée\n".encode()
    s3.put_object(Bucket=OUTPUT_BUCKET, Key="labels/catalogue.txt", Body=body)
    assert read_labels(f"s3://{OUTPUT_BUCKET}/labels/catalogue.txt", s3) == ["cat", "dog", "crème brûlée"]


@pytest.mark.parametrize("spec", ["", " , ,"])
def test_a_set_without_labels_is_an_error_naming_it(spec: str) -> None:
    with pytest.raises(LabelError, match=re.escape(f"the label set {spec!r} holds no labels")):
        read_labels(spec)


def test_an_s3_file_of_comments_only_is_an_error_naming_its_uri(s3: Any) -> None:
    s3.put_object(Bucket=OUTPUT_BUCKET, Key="labels/empty.txt", Body=b"# nothing yet\n\n")
    with pytest.raises(LabelError, match=f"s3://{OUTPUT_BUCKET}/labels/empty.txt' holds no labels"):
        read_labels(f"s3://{OUTPUT_BUCKET}/labels/empty.txt", s3)


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        (f"s3://{OUTPUT_BUCKET}/labels/missing.txt", "NoSuchKey"),
        (f"s3://{OUTPUT_BUCKET}/labels/latin-1.txt", "can't decode"),
        (f"s3://{OUTPUT_BUCKET}", "not an s3://bucket/key URL"),
    ],
)
def test_an_unreadable_s3_file_is_an_error_naming_its_uri(s3: Any, uri: str, reason: str) -> None:
    s3.put_object(Bucket=OUTPUT_BUCKET, Key="labels/latin-1.txt", Body="crème".encode("latin-1"))
    with pytest.raises(LabelError, match=f"cannot read the label set {re.escape(uri)}: .*{reason}"):
        read_labels(uri, s3)


def test_each_label_is_embedded_as_its_prompt_with_the_models_temperature(model: ClipModel) -> None:
    label_set = LabelSet.embed(model, LABELS, batch_size=4)  # two batches of prompts

    assert label_set.labels == LABELS
    assert label_set.vectors.dtype == np.float32 and label_set.vectors.shape == (len(LABELS), model.dimensions)
    one_batch = model.embed_texts([f"a photo of a {label}" for label in LABELS])
    np.testing.assert_allclose(label_set.vectors, one_batch, atol=1e-6)
    assert label_set.logit_scale == pytest.approx(math.exp(model.network.logit_scale.detach().item()))

    with pytest.raises(LabelError, match="at least one label"):
        LabelSet.embed(model, [])


def test_the_temperature_is_capped_at_100_as_clip_does_and_is_100_without_one(tiny_checkpoint: Path) -> None:
    hot = load(TINY_MODEL, str(tiny_checkpoint), "cpu")
    with torch.no_grad():
        hot.network.logit_scale.fill_(math.log(1000))
    assert LabelSet.embed(hot, LABELS).logit_scale == 100

    del hot.network.logit_scale
    assert LabelSet.embed(hot, LABELS).logit_scale == 100


def test_an_image_vector_equal_to_a_labels_text_vector_ranks_that_label_first(model: ClipModel) -> None:
    label_set = LabelSet.embed(model, LABELS)
    picture = model.embed(model.preprocess(photo()).unsqueeze(0))[0]
    vectors = np.stack([label_set.vectors[LABELS.index("red bicycle")], label_set.vectors[LABELS.index("astronaut")], picture])

    best = label_set.top(vectors, 3)
    everything = label_set.top(vectors, len(LABELS))

    assert [[label.label for label in row] for row in best] == [[label.label for label in row[:3]] for row in everything]
    assert best[0][0].label == "red bicycle" and best[0][0].score == pytest.approx(1.0, abs=1e-5)
    assert best[1][0].label == "astronaut"
    reference = torch.softmax(label_set.logit_scale * torch.from_numpy(vectors @ label_set.vectors.T), dim=1)
    for vector, row, probabilities in zip(vectors, everything, reference, strict=True):
        assert sorted(label.label for label in row) == sorted(LABELS)
        assert [label.score for label in row] == sorted((label.score for label in row), reverse=True)
        assert row[0].probability == max(label.probability for label in row)
        assert sum(label.probability for label in row) == pytest.approx(1.0, abs=1e-6)
        for label in row:
            assert label.score == pytest.approx(cosine(vector, label_set.vectors[LABELS.index(label.label)]), abs=1e-6)
            assert label.probability == pytest.approx(probabilities[LABELS.index(label.label)].item(), abs=1e-6)
    assert label_set.top(vectors, 100) == everything  # k is capped at the size of the set
    with pytest.raises(ValueError, match="k=0 must be at least 1"):
        label_set.top(vectors, 0)


def test_config_reads_the_label_set_and_how_many_keywords() -> None:
    base = {"MANIFEST_URI": "s3://b/m.json", "OUTPUT_BUCKET": "out"}
    assert (WorkerConfig.from_env(base).labels, WorkerConfig.from_env(base).keywords_top_k) == (None, 5)
    assert WorkerConfig.from_env({**base, "CLIP_LABELS": "  "}).labels is None
    on = WorkerConfig.from_env({**base, "CLIP_LABELS": "s3://b/labels.txt", "KEYWORDS_TOP_K": "3"})
    assert (on.labels, on.keywords_top_k) == ("s3://b/labels.txt", 3)
    with pytest.raises(ConfigError, match="KEYWORDS_TOP_K=0 must be at least 1"):
        WorkerConfig.from_env({**base, "KEYWORDS_TOP_K": "0"})


def test_a_cache_dir_keeps_a_label_sets_vectors_for_the_next_process(model: ClipModel, tmp_path: Path) -> None:
    labels = ["cat", "dog", "rocket"]
    first = LabelSet.cached(model, labels, str(tmp_path))
    assert first.vectors == pytest.approx(LabelSet.embed(model, labels).vectors)
    (stored,) = (tmp_path / "label-vectors").glob("*.npy")
    # Whatever the file holds is what the next load returns: the text tower does not run again.
    marker = np.eye(3, first.vectors.shape[1], dtype=np.float32)
    np.save(stored, marker)
    assert np.array_equal(LabelSet.cached(model, labels, str(tmp_path)).vectors, marker)
    # Another label set (or order) is another entry.
    assert not np.array_equal(LabelSet.cached(model, ["dog", "cat", "rocket"], str(tmp_path)).vectors, marker)
    assert len(list((tmp_path / "label-vectors").glob("*.npy"))) == 2


def test_baking_an_image_caches_the_weights_load_and_the_default_sets_vectors(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from clip_worker import bake

    bake.main([TINY_MODEL, str(tiny_checkpoint), str(tmp_path)])
    (baked,) = (tmp_path / "label-vectors").glob("*.npy")
    model = load(TINY_MODEL, str(tiny_checkpoint), "cpu")
    assert np.array_equal(LabelSet.cached(model, DEFAULT_LABELS, str(tmp_path)).vectors, np.load(baked))
    assert np.load(baked).shape == (len(DEFAULT_LABELS), model.dimensions)
