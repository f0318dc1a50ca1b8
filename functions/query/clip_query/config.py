"""The query API's configuration: every environment variable it reads, parsed once, here."""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from clip_store.database import INDEX_CACHE_BYTES
from clip_worker.sandbox import Limits


class ConfigError(ValueError):
    """A setting that is missing or malformed; the message names the variable."""


class QueryConfig(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True, protected_namespaces=())

    #: Where the worker writes; the API searches the vector store under this bucket and prefix.
    output_bucket: str = Field(alias="OUTPUT_BUCKET", min_length=3)
    output_prefix: str = Field(alias="OUTPUT_PREFIX", default="")
    #: The worker's model and weights: a query vector only compares with vectors of the same model.
    model: str = Field(alias="CLIP_MODEL", default="ViT-B-32")
    pretrained: str = Field(alias="CLIP_PRETRAINED", default="openai")
    model_config_path: str | None = Field(alias="CLIP_MODEL_CONFIG", default=None)
    cache_dir: str | None = Field(alias="CLIP_CACHE_DIR", default=None)
    #: /classify's label set when a request brings none: `default`, a comma-separated list, or s3://.
    labels: str = Field(alias="CLIP_LABELS", default="default")
    #: How many labels /classify returns when a request does not say (the worker's keyword count).
    top_k: int = Field(alias="KEYWORDS_TOP_K", default=5, ge=1)
    #: Lambda refuses synchronous payloads over 6 MB; the same limit applies locally.
    max_body_bytes: int = Field(alias="MAX_BODY_BYTES", default=6 * 1024 * 1024, ge=1024)
    #: How long a request's whole body may take to arrive once its headers have. Behind API Gateway
    #: the body is whole before the function runs; served by uvicorn (`clip-pipeline serve`), a client
    #: that stalls mid-body would otherwise hold its connection and task forever (uvicorn's own
    #: timeouts cover idle connections, not a body that stops). 30 s is 6 MB at 200 kB/s.
    body_timeout_s: float = Field(alias="BODY_TIMEOUT_SECONDS", default=30, gt=0)
    #: Texts and images in one request.
    max_items: int = Field(alias="MAX_ITEMS", default=32, ge=1)
    #: Decoded pixels per image, read from its header before decoding (decompression bombs).
    max_image_pixels: int = Field(alias="MAX_IMAGE_PIXELS", default=25_000_000, ge=1)
    #: Decoded pixels of all a request's images together. Decoding costs time and memory in
    #: proportion (up to 30 bytes a pixel while an RGBA image is flattened): this is what keeps the
    #: worst request inside API Gateway's 29 s and a 3008 MB function (docs/query-api.md, measured).
    max_request_pixels: int = Field(alias="MAX_REQUEST_PIXELS", default=25_000_000, ge=1)
    #: What decoding one request's images may cost, enforced by the operating system on the process
    #: that does it (clip_worker/sandbox.py): CPU seconds and MB of memory for the look at their headers,
    #: then the same again for decoding them, and a deadline for each. Sized for API Gateway's 29 s and a
    #: 3008 MB function: MAX_REQUEST_PIXELS of the costliest format measured (a transparent WebP,
    #: flattened) takes 1.3-1.7 s and adds 790 MB (docs/query-api.md).
    decode_cpu_s: int = Field(alias="DECODE_CPU_SECONDS", default=10, ge=1)
    decode_memory_mb: int = Field(alias="DECODE_MEMORY_MB", default=1024, ge=64)
    decode_wall_s: int = Field(alias="DECODE_WALL_SECONDS", default=12, ge=1)
    #: Decoding processes: a Lambda container serves one request at a time.
    decode_workers: int = Field(alias="DECODE_WORKERS", default=1, ge=1)
    #: Characters per text, checked before tokenising: the tokenizer's cost grows with the square of
    #: a word's length (a 10,000-letter word takes it 10 s).
    max_text_chars: int = Field(alias="MAX_TEXT_CHARS", default=1_000, ge=1)
    #: A request's own labels: each is tokenized (up to 35 ms for one of the vocabulary's longest
    #: pieces glued together) and embedded by the text tower (65 ms for ViT-B-32 on 2 vCPUs) on
    #: every call, so this bounds /classify's time. Larger sets belong in CLIP_LABELS, baked.
    max_labels: int = Field(alias="MAX_LABELS", default=50, ge=1)
    #: The most search results (k) one request may ask for.
    max_results: int = Field(alias="MAX_RESULTS", default=100, ge=1)
    #: How stale a warm container's view of the vector store may get: it checks for new commits this often.
    index_refresh_s: int = Field(alias="INDEX_REFRESH_SECONDS", default=60, ge=0)
    #: The index's partitions searched per query: more finds more of the true neighbours, slower.
    #: 0 uses the settings the indexer measured to reach recall@10 0.98 on the store's own vectors and
    #: label prompts (clip_store.recall; /health shows them; docs/search.md, "Recall").
    search_nprobes: int = Field(alias="SEARCH_NPROBES", default=0, ge=0)
    #: What a warm container keeps of the index searches read (LanceDB's index cache). Past it, each search
    #: reads the partitions it probes again: at 10M vectors the 4-bit codes are 2.8 GB, and a text query
    #: probing a quarter of them takes ~0.6 s instead of ~0.05 s (docs/search.md, "Query memory is
    #: bounded"). Raise it with QueryMemorySize: the cache comes on top of the model and a request's decoding.
    search_index_cache_mb: int = Field(alias="SEARCH_INDEX_CACHE_MB", default=INDEX_CACHE_BYTES // 2**20, ge=16)
    #: Lifetime of the presigned preview URLs that search results carry.
    preview_url_s: int = Field(alias="PREVIEW_URL_SECONDS", default=900, ge=1)

    @property
    def decode_limits(self) -> Limits:
        return Limits(self.decode_cpu_s, self.decode_memory_mb, self.decode_wall_s, unit="request")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> QueryConfig:
        env = os.environ if env is None else env
        # Empty values mean "not set", as in the template, where an unused parameter is "".
        values = {name: value for name, value in env.items() if value != ""}
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(f"{error['loc'][0]}: {error['msg']}" for error in exc.errors())
            raise ConfigError(f"invalid query API configuration: {problems}") from None
