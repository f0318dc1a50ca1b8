"""Where a store lives, and how LanceDB reaches it: a local folder, or a prefix of the output bucket.

LanceDB talks to S3 through its own Rust client (object_store), not boto3, so the standard AWS
settings are translated here, once, into its storage options. Credentials are not: its client
follows the same chain boto3 does (environment, profile, the Lambda or ECS task role).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from clip_shared import keys


def store_uri(bucket: str, prefix: str, model_id: str) -> str:
    """The store of one model's vectors in the output bucket; vectors of two models never mix."""
    return keys.s3_url(bucket, keys.store_prefix(prefix, model_id)).rstrip("/")


def tombstones_uri(bucket: str, prefix: str) -> str:
    """The tombstones every model's store in the output bucket consults (clip_store.tombstones)."""
    return keys.s3_url(bucket, keys.tombstones_prefix(prefix)).rstrip("/")


def stored_models(s3: Any, bucket: str, prefix: str) -> list[str]:
    """The model ids that have a store in the output bucket (one LIST, by common prefix)."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=keys.stores_prefix(prefix), Delimiter="/")
    return [common["Prefix"].rstrip("/").rsplit("/", 1)[-1] for page in pages for common in page.get("CommonPrefixes", [])]


@dataclass(frozen=True)
class StorageSettings:
    #: AWS_ENDPOINT_URL: an emulator (moto) or an S3-compatible service instead of AWS.
    endpoint: str | None = None
    region: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StorageSettings:
        env = os.environ if env is None else env
        return cls(
            endpoint=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
        )

    def options(self, uri: str) -> dict[str, str]:
        if not uri.startswith("s3://"):
            return {}
        options: dict[str, str] = {}
        if self.region:
            options["aws_region"] = self.region
        if self.endpoint:
            options["aws_endpoint"] = self.endpoint
            # An emulator on loopback speaks plain HTTP; object_store refuses it unless told.
            options["allow_http"] = str(self.endpoint.startswith("http://")).lower()
        return options
