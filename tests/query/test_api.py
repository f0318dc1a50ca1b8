"""Every endpoint over real HTTP, with real photos and the vectors the real worker stored."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import numpy as np
import open_clip
import pytest
import requests
import torch
import torch.nn.functional as F
from PIL import Image

from clip_query.api import create_app
from clip_query.config import ConfigError, QueryConfig
from clip_shared import keys
from clip_shared.mime import ACCEPTED_MIME_TYPES
from clip_store import IndexPolicy, VectorStore, database, maintain, store_uri
from clip_worker.labels import DEFAULT_LABELS, PROMPT
from clip_worker.model import ClipModel
from tests.conftest import INPUT_BUCKET, OUTPUT_BUCKET
from tests.query.conftest import STORED, Stored, embed_with_worker, served
from tests.store.support import clustered, shard, trusting
from tests.support import TINY_MODEL, encode, photo, stored_vectors

CAT = STORED["photos/cat.jpg"]
ROCKET = STORED["photos/rocket.jpg"]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def stored_vector(stored: Stored, model: ClipModel, key: str) -> list[float]:
    """The vector the worker stored for an uploaded object, read from its Parquet shards."""
    return [float(value) for value in stored_vectors(stored.s3, model.id)[key]]


def reference_text(model: ClipModel, texts: list[str]) -> np.ndarray:
    """open_clip's own text embedding, computed without the service's code."""
    with torch.inference_mode():
        features = model.network.encode_text(open_clip.get_tokenizer(TINY_MODEL)(texts))
    return F.normalize(features, dim=-1).numpy()


def test_single_image_json_returns_the_workers_vector(api: str, stored: Stored, model: ClipModel) -> None:
    # The worker embedded these four in one batch; a batch's matrix products may round the last bit
    # of a float32 differently from a batch of one, hence the tolerance of about one ulp.
    for key, data in STORED.items():
        response = requests.post(f"{api}/embed", json={"image": b64(data)}, timeout=30)
        assert response.status_code == 200, response.text
        assert response.json() == pytest.approx(stored_vector(stored, model, key), abs=1e-6), key
    # Embedded on its own by the worker, an image gets the very same floats from the API.
    alone = encode(photo("coffee.png"), "TIFF")
    embed_with_worker(stored, {"alone/coffee.tif": alone}, "m-alone")
    assert requests.post(f"{api}/embed", json={"image": b64(alone)}, timeout=30).json() == stored_vector(
        stored, model, "alone/coffee.tif"
    )


def test_single_text_json_returns_the_text_towers_unit_vector(api: str, model: ClipModel) -> None:
    response = requests.post(f"{api}/embed", json={"text": "a cat on a sofa"}, timeout=30)
    assert response.status_code == 200
    vector = np.asarray(response.json())
    assert vector.shape == (model.dimensions,)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    assert vector == pytest.approx(reference_text(model, ["a cat on a sofa"])[0], abs=1e-5)


def test_multipart_returns_every_vector_keyed_by_the_callers_field_names(api: str) -> None:
    coffee = STORED["photos/coffee.webp"]
    files: list[tuple[str, Any]] = [
        ("cat", ("cat.jpg", CAT, "image/jpeg")),
        ("shots", ("a.webp", coffee, "image/webp")),
        ("shots", ("b.jpg", ROCKET, "application/octet-stream")),
        ("caption", (None, "a cat")),
        ("query", (None, "a rocket launch")),
    ]
    response = requests.post(f"{api}/embed", files=files, timeout=30)
    assert response.status_code == 200, response.text
    vectors = response.json()["vectors"]
    assert sorted(vectors) == ["caption", "cat", "query", "shots[0]", "shots[1]"]
    # Each vector is the one the single-input form gives for the same input.
    singles = {
        "cat": {"image": b64(CAT)},
        "shots[0]": {"image": b64(coffee)},
        "shots[1]": {"image": b64(ROCKET)},
        "caption": {"text": "a cat"},
        "query": {"text": "a rocket launch"},
    }
    for name, body in singles.items():
        assert vectors[name] == pytest.approx(requests.post(f"{api}/embed", json=body, timeout=30).json(), abs=1e-6), name


def test_json_lists_and_objects_are_keyed_by_position_or_name(api: str) -> None:
    response = requests.post(f"{api}/embed", json={"texts": ["a cat", "a rocket"], "images": {"mine": b64(CAT)}}, timeout=30)
    assert response.status_code == 200
    body = response.json()
    assert sorted(body["vectors"]) == ["mine", "texts[0]", "texts[1]"]
    assert body["model"] == TINY_MODEL and body["dimensions"] == 32
    assert body["request_id"]


def test_similarity_compares_every_text_with_every_image(api: str) -> None:
    texts = {"t1": "a cat", "t2": "a rocket"}
    images = {"cat": b64(CAT), "rocket": b64(ROCKET)}
    response = requests.post(f"{api}/similarity", json={"texts": texts, "images": images}, timeout=30)
    assert response.status_code == 200, response.text
    similarity = response.json()["similarity"]
    for text_name, text in texts.items():
        text_vector = np.asarray(requests.post(f"{api}/embed", json={"text": text}, timeout=30).json())
        for image_name, image in images.items():
            image_vector = np.asarray(requests.post(f"{api}/embed", json={"image": image}, timeout=30).json())
            cosine = float(text_vector @ image_vector)
            assert similarity[text_name][image_name]["cosine"] == pytest.approx(cosine, abs=1e-5)
            assert similarity[text_name][image_name]["score"] == pytest.approx(100 * max(cosine, 0.0), abs=0.01)


def test_classify_ranks_first_the_label_whose_text_embedding_is_nearest(api: str, model: ClipModel) -> None:
    candidates = [f"thing number {n}" for n in range(20)]
    image_vector = np.asarray(requests.post(f"{api}/embed", json={"image": b64(CAT)}, timeout=30).json())
    # The label the model's own text tower puts nearest the image, computed here with open_clip alone.
    nearest = candidates[int(np.argmax(reference_text(model, [PROMPT.format(label) for label in candidates]) @ image_vector))]
    response = requests.post(f"{api}/classify", json={"image": b64(CAT), "labels": candidates, "top_k": 3}, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    ranked = body["images"]["image"]
    assert len(ranked) == 3 and ranked[0]["label"] == nearest
    assert [label["probability"] for label in ranked] == sorted((label["probability"] for label in ranked), reverse=True)
    assert body["label_set"] == "request" and body["labels_compared"] == 20

    everything = requests.post(
        f"{api}/classify", files={"image": ("cat.jpg", CAT)}, data={"labels": ",".join(candidates), "top_k": "20"}, timeout=30
    ).json()["images"]["image"]
    assert everything[0]["label"] == nearest
    assert sum(label["probability"] for label in everything) == pytest.approx(1.0, abs=1e-4)


def test_classify_without_labels_uses_the_default_set(api: str) -> None:
    body = requests.post(f"{api}/classify", json={"image": b64(CAT)}, timeout=60).json()
    assert body["label_set"] == "default" and body["labels_compared"] == len(DEFAULT_LABELS)
    assert len(body["images"]["image"]) == 5  # KEYWORDS_TOP_K's default
    assert {label["label"] for label in body["images"]["image"]} <= set(DEFAULT_LABELS)


def test_search_by_text_returns_the_nearest_stored_image_first(api: str, stored: Stored, model: ClipModel) -> None:
    query = "a photograph of an astronaut"
    text_vector = reference_text(model, [query])[0]
    scores = {key: float(np.asarray(stored_vector(stored, model, key)) @ text_vector) for key in STORED}
    expected = sorted(scores, key=lambda key: scores[key], reverse=True)
    response = requests.get(f"{api}/search", params={"q": query, "k": "3"}, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["indexed"] >= len(STORED)
    assert [result["url"] for result in body["results"]] == [keys.s3_url(INPUT_BUCKET, key) for key in expected[:3]]
    assert body["results"][0]["score"] == pytest.approx(scores[expected[0]], abs=1e-5)


def test_search_by_image_finds_that_image_with_a_working_preview(api: str) -> None:
    response = requests.post(f"{api}/search", files={"image": ("query.jpg", ROCKET)}, data={"k": "2"}, timeout=30)
    assert response.status_code == 200, response.text
    best = response.json()["results"][0]
    assert best["url"] == keys.s3_url(INPUT_BUCKET, "photos/rocket.jpg")
    assert best["score"] == pytest.approx(1.0, abs=1e-4)
    assert requests.get(best["preview"], timeout=30).content == ROCKET


def test_search_names_and_previews_keys_with_url_characters_byte_for_byte(api: str, stored: Stored) -> None:
    # Each awkward key beside the key a URL parser would cut it to, holding another picture.
    pictures = ("horse.png", "camera.png", "moon.png", "hubble_deep_field.jpg", "coins.png")
    names = ("IMG #12.jpg", "IMG ", "what?size=1.png", "what", "/leading slash+plus.png")
    files = {name: encode(photo(picture).resize((128, 128)), "PNG") for name, picture in zip(names, pictures, strict=True)}
    embed_with_worker(stored, files, "m-awkward")
    for key, data in files.items():
        answer = requests.post(f"{api}/search", json={"image": b64(data), "k": 1}, timeout=30)
        assert answer.status_code == 200, answer.text
        found = answer.json()["results"][0]
        assert found["url"] == keys.s3_url(INPUT_BUCKET, key)
        assert requests.get(found["preview"], timeout=30).content == data, key


def test_search_sees_images_the_indexer_adds_after_it_started(api: str, stored: Stored) -> None:
    requests.get(f"{api}/search", params={"q": "warm up"}, timeout=30)
    horse = encode(photo("horse.png"), "PNG")
    embed_with_worker(stored, {"later/horse.png": horse}, "m-later")
    results = requests.post(f"{api}/search", json={"image": b64(horse), "k": 1}, timeout=30).json()["results"]
    assert results[0]["url"] == keys.s3_url(INPUT_BUCKET, "later/horse.png")


def test_the_request_id_is_the_callers_or_a_new_uuid(api: str) -> None:
    mine = requests.post(f"{api}/embed", json={"texts": ["a"]}, headers={"X-Request-Id": "trace-42"}, timeout=30)
    assert mine.headers["x-request-id"] == "trace-42" and mine.json()["request_id"] == "trace-42"
    refused = requests.post(f"{api}/embed", json={"texts": 3}, headers={"request_id": "trace-43"}, timeout=30)
    assert refused.headers["x-request-id"] == "trace-43" and refused.json()["request_id"] == "trace-43"
    fresh = requests.get(f"{api}/health", timeout=30)
    assert str(uuid.UUID(fresh.headers["x-request-id"])) == fresh.json()["request_id"]


def big_png(side: int) -> bytes:
    """Over the test limit of 4 MP, yet a few kB: a decompression bomb in miniature."""
    return encode(photo().resize((64, 64)).convert("1").resize((side, side)), "PNG")


TRUNCATED_JPEG = CAT[: len(CAT) // 3]
LONG_TEXT = "many words " * 60  # ~120 tokens, over the 77-token context


@pytest.mark.parametrize(
    ("method", "path", "request_args", "status", "code", "field", "limit"),
    [
        (
            "post",
            "/embed",
            {"data": b"x" * 2_000_001, "headers": {"content-type": "application/json"}},
            413,
            "body-too-large",
            None,
            2_000_000,
        ),
        ("post", "/embed", {"json": {"texts": ["a"] * 7}}, 400, "too-many-items", None, 6),
        ("post", "/embed", {"files": [("f", ("a.jpg", CAT))] * 7}, 400, "too-many-items", None, 6),
        ("post", "/embed", {"json": {"image": None}}, 400, "invalid-request", "image", None),
        ("post", "/embed", {"json": {"image": "not base64!"}}, 400, "invalid-base64", "image", None),
        ("post", "/embed", {"json": {"image": b64(b"%PDF-1.7\n" + b"0" * 300)}}, 415, "unsupported-type", "image", None),
        (
            "post",
            "/embed",
            {"files": {"doc": ("notes.txt", b"just some text, not a picture" * 20)}},
            415,
            "unsupported-type",
            "doc",
            None,
        ),
        ("post", "/embed", {"json": {"images": [b64(TRUNCATED_JPEG)]}}, 400, "corrupt-image", "images[0]", None),
        ("post", "/embed", {"json": {"image": b64(big_png(2100))}}, 400, "too-many-pixels", "image", 4_000_000),
        ("post", "/embed", {"json": {"text": LONG_TEXT}}, 400, "text-too-long", "text", 77),
        ("post", "/embed", {"json": {"texts": {"essay": "word " * 500}}}, 400, "text-too-long", "essay", 2000),
        ("post", "/embed", {"json": {"text": "   "}}, 400, "invalid-request", "text", None),
        ("post", "/embed", {"json": {"txt": "typo"}}, 400, "invalid-request", "txt", None),
        ("post", "/embed", {"json": ["a", "b"]}, 400, "invalid-request", None, None),
        (
            "post",
            "/embed",
            {"data": b"{not json", "headers": {"content-type": "application/json"}},
            400,
            "invalid-request",
            None,
            None,
        ),
        ("post", "/embed", {"data": b""}, 400, "invalid-request", None, None),
        (
            "post",
            "/embed",
            {"data": b"hello", "headers": {"content-type": "text/plain"}},
            415,
            "unsupported-media-type",
            None,
            None,
        ),
        ("post", "/embed", {"json": {}}, 400, "invalid-request", None, None),
        ("post", "/embed", {"json": {"texts": ["a"], "truncate": "maybe"}}, 400, "invalid-request", "truncate", None),
        ("post", "/similarity", {"json": {"texts": ["a cat"]}}, 400, "invalid-request", "images", None),
        ("post", "/classify", {"json": {"labels": ["a", "b"]}}, 400, "invalid-request", "image", None),
        (
            "post",
            "/classify",
            {"json": {"image": b64(CAT), "labels": [f"l{n}" for n in range(51)]}},
            400,
            "too-many-labels",
            "labels",
            50,
        ),
        ("post", "/classify", {"json": {"image": b64(CAT), "labels": []}}, 400, "invalid-request", "labels", None),
        ("post", "/classify", {"json": {"image": b64(CAT), "top_k": 0}}, 400, "invalid-request", "top_k", None),
        ("post", "/classify", {"json": {"image": b64(CAT), "labels": [LONG_TEXT]}}, 400, "text-too-long", "labels", 77),
        ("get", "/search", {"params": {"k": 3}}, 400, "invalid-request", "q", None),
        ("get", "/search", {"params": {"q": "cat", "k": 21}}, 400, "over-limit", "k", 20),
        ("get", "/search", {"params": {"q": "cat", "k": "ten"}}, 400, "invalid-request", "k", None),
        ("get", "/search", {"params": {"q": LONG_TEXT}}, 400, "text-too-long", "q", 77),
        ("post", "/search", {"json": {"texts": ["a", "b"]}}, 400, "invalid-request", "image", None),
        ("get", "/nowhere", {}, 404, "not-found", None, None),
        ("get", "/embed", {}, 405, "method-not-allowed", None, None),
    ],
)
def test_every_limit_and_bad_input_is_a_documented_4xx(
    api: str, method: str, path: str, request_args: dict[str, Any], status: int, code: str, field: str | None, limit: int | None
) -> None:
    response = getattr(requests, method)(f"{api}{path}", timeout=30, **request_args)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["request_id"] == response.headers["x-request-id"]
    error = body["error"]
    assert error["code"] == code and error["message"]
    assert error.get("field") == field
    assert error.get("limit") == limit
    if code == "unsupported-type":
        assert error["accepted"] == sorted(ACCEPTED_MIME_TYPES)


def test_truncate_embeds_the_beginning_of_a_long_text(api: str, model: ClipModel) -> None:
    response = requests.post(f"{api}/embed", json={"texts": [LONG_TEXT], "truncate": True}, timeout=30)
    assert response.status_code == 200
    assert response.json()["vectors"]["texts[0]"] == pytest.approx(reference_text(model, [LONG_TEXT])[0], abs=1e-5)
    assert requests.get(f"{api}/search", params={"q": LONG_TEXT, "truncate": "true"}, timeout=30).status_code == 200


def test_the_demo_page_and_health(api: str) -> None:
    page = requests.get(api, timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    health = requests.get(f"{api}/health", timeout=30).json()
    assert health["status"] == "ok" and health["model"] == TINY_MODEL


def part(name: str, data: bytes, content_type: str | None = None) -> bytes:
    """One multipart part with no filename, as `curl -F 'name=<file'` sends it (no type either)."""
    header = f'Content-Disposition: form-data; name="{name}"\r\n'
    if content_type:
        header += f"Content-Type: {content_type}\r\n"
    return b"--b\r\n" + header.encode() + b"\r\n" + data + b"\r\n"


def form(*parts: bytes) -> dict[str, Any]:
    return {"data": b"".join(parts) + b"--b--\r\n", "headers": {"content-type": "multipart/form-data; boundary=b"}, "timeout": 30}


def test_an_image_sent_as_a_plain_field_is_embedded_as_the_image_it_is(api: str) -> None:
    gif = encode(photo("coffee.png").resize((200, 150)), "GIF")
    # The bytes say what a part is; a Content-Type of image/* says so too, whatever the bytes start with.
    noise = np.random.default_rng(3).integers(0, 256, (640, 640, 3), dtype=np.uint8)
    big_png = encode(Image.fromarray(noise), "PNG")  # past Starlette's 1 MB for a plain field
    assert len(big_png) > 1024 * 1024
    response = requests.post(
        f"{api}/embed",
        **form(
            part("photo", gif), part("typed", ROCKET, "image/jpeg"), part("big", big_png), part("caption", b"a cup of coffee")
        ),
    )
    assert response.status_code == 200, response.text
    vectors = response.json()["vectors"]
    for name, body in {
        "photo": {"image": b64(gif)},
        "typed": {"image": b64(ROCKET)},
        "big": {"image": b64(big_png)},
        "caption": {"text": "a cup of coffee"},
    }.items():
        assert vectors[name] == pytest.approx(requests.post(f"{api}/embed", json=body, timeout=30).json(), abs=1e-6), name


def test_a_text_part_is_read_in_the_charset_it_names(api: str) -> None:
    response = requests.post(f"{api}/embed", **form(part("q", "un café crème".encode("latin-1"), "text/plain; charset=latin-1")))
    assert response.status_code == 200, response.text
    expected = requests.post(f"{api}/embed", json={"text": "un café crème"}, timeout=30).json()
    assert response.json()["vectors"]["q"] == pytest.approx(expected, abs=1e-6)


def indexed_store(stored: Stored, model: ClipModel, prefix: str, seed: int) -> VectorStore:
    """A store of its own (another prefix) of 2,100 vectors, indexed and measured as the indexer does it."""
    store = VectorStore(store_uri(OUTPUT_BUCKET, prefix, model.id), settings=stored.storage)
    vectors = clustered(2_100, model.dimensions, seed=seed)
    store.ingest(shard([f"images/{i:05d}.jpg" for i in range(2_100)], vectors), shard="s", still_current=trusting)
    maintain(store, IndexPolicy(exact_below=2_000, rows_per_partition=100))
    return store


def test_health_shows_the_search_settings_measured_on_the_store_and_a_given_nprobes_wins(
    stored: Stored, query_config: QueryConfig, model: ClipModel
) -> None:
    config = query_config.model_copy(update={"output_prefix": "measured/"})
    tuning = indexed_store(stored, model, "measured/", seed=5).index_state().tuning
    assert tuning is not None

    with served(create_app(config, stored.service(config, model))) as url:
        search = requests.get(f"{url}/health", timeout=30).json()["search"]
    assert (search["nprobes"], search["refine_factor"], search["recall"]) == (tuning.nprobes, tuning.refine_factor, tuning.recall)
    assert (search["reached"], search["measured_rows"], search["target"]) == (tuning.reached, 2_100, 0.98)

    given = config.model_copy(update={"search_nprobes": tuning.nprobes + 7})
    with served(create_app(given, stored.service(given, model))) as url:
        search = requests.get(f"{url}/health", timeout=30).json()["search"]
    assert (search["nprobes"], search["refine_factor"]) == (tuning.nprobes + 7, tuning.refine_factor)


def test_a_warm_function_keeps_the_index_in_the_cache_search_index_cache_mb_sizes(
    stored: Stored, query_config: QueryConfig, model: ClipModel
) -> None:
    config = query_config.model_copy(update={"output_prefix": "cached/"})
    indexed_store(stored, model, "cached/", seed=8)
    # A bound no other test uses, so that its process-wide cache holds only what this service read.
    cache = database.session(17 * 2**20)
    assert cache.approx_num_items == 0

    given = QueryConfig.from_env({**config.model_dump(by_alias=True, exclude_none=True), "SEARCH_INDEX_CACHE_MB": "17"})
    with served(create_app(given, stored.service(given, model))) as url:
        response = requests.post(f"{url}/search", json={"text": "a cat"}, timeout=30)
    assert response.status_code == 200, response.text
    # What the search read stays for the next one, in the cache of the size asked for (tests/store: its bound holds).
    assert cache.approx_num_items > 0 and 0 < cache.size_bytes <= 17 * 2**20


def test_a_search_index_cache_under_16_mb_is_refused_by_name(query_config: QueryConfig) -> None:
    with pytest.raises(ConfigError, match="SEARCH_INDEX_CACHE_MB"):
        QueryConfig.from_env({**query_config.model_dump(by_alias=True, exclude_none=True), "SEARCH_INDEX_CACHE_MB": "8"})
