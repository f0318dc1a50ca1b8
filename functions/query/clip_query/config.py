"""The query API's configuration: every environment variable it reads, parsed once, here."""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A setting that is missing or malformed; the message names the variable."""


class QueryConfig(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True, protected_namespaces=())

    #: Where the worker writes; the API searches the Parquet shards under this bucket and prefix.
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
    #: Texts and images in one request.
    max_items: int = Field(alias="MAX_ITEMS", default=32, ge=1)
    #: Decoded pixels per image; a 50 MP RGB image is 150 MB, a fair share of a Lambda's memory.
    max_image_pixels: int = Field(alias="MAX_IMAGE_PIXELS", default=50_000_000, ge=1)
    #: Characters per text, checked before tokenising so a huge text costs nothing.
    max_text_chars: int = Field(alias="MAX_TEXT_CHARS", default=10_000, ge=1)
    max_labels: int = Field(alias="MAX_LABELS", default=1_000, ge=1)
    #: The most search results (k) one request may ask for.
    max_results: int = Field(alias="MAX_RESULTS", default=100, ge=1)
    #: How often a warm container looks for new Parquet shards.
    index_refresh_s: int = Field(alias="INDEX_REFRESH_SECONDS", default=60, ge=0)
    #: Lifetime of the presigned preview URLs that search results carry.
    preview_url_s: int = Field(alias="PREVIEW_URL_SECONDS", default=900, ge=1)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "QueryConfig":
        env = os.environ if env is None else env
        # Empty values mean "not set", as in the template, where an unused parameter is "".
        values = {name: value for name, value in env.items() if value != ""}
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(f"{error['loc'][0]}: {error['msg']}" for error in exc.errors())
            raise ConfigError(f"invalid query API configuration: {problems}") from None
