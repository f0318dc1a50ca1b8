"""What happened to every object, read back from the output bucket's CloudEvents documents."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from clip_shared import keys
from clip_shared.events import EventType


@dataclass(frozen=True)
class Failure:
    code: str
    message: str
    #: The id of the event that recorded it: a new failure of the same object has a new one.
    event_id: str = ""


@dataclass
class Outcomes:
    embedded: list[str] = field(default_factory=list)
    failed: dict[str, Failure] = field(default_factory=dict)
    rejected: dict[str, Failure] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "embedded": len(self.embedded),
            "failed": {url: {"code": f.code, "message": f.message} for url, f in sorted(self.failed.items())},
            "rejected": {url: {"code": r.code, "message": r.message} for url, r in sorted(self.rejected.items())},
        }


def _keys(s3: Any, bucket: str, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def tally(s3: Any, bucket: str, prefix: str, model_id: str) -> Outcomes:
    documents = _keys(s3, bucket, f"{keys.normalise_prefix(prefix)}events/{model_id}/")
    documents += _keys(s3, bucket, f"{keys.normalise_prefix(prefix)}rejected/")
    with ThreadPoolExecutor(32) as pool:
        events = list(pool.map(lambda key: json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read()), documents))
    outcomes = Outcomes()
    for event in events:
        url = event["data"]["document"]["url"]
        error = event["data"].get("error", {})
        if event["type"] == EventType.CREATED:
            outcomes.embedded.append(url)
        elif event["type"] == EventType.FAILED:
            outcomes.failed[url] = Failure(error.get("code", ""), error.get("message", ""), event.get("id", ""))
        else:
            outcomes.rejected[url] = Failure(error.get("code", ""), error.get("message", ""), event.get("id", ""))
    return outcomes
