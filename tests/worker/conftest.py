from __future__ import annotations

from collections.abc import Iterator

import pytest

from clip_worker.config import WorkerConfig
from clip_worker.sandbox import Sandbox


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    """Decoding processes under the worker's default budget, shared by a module's tests (each takes seconds to start)."""
    config = WorkerConfig(manifest_uri="", output_bucket="")
    with Sandbox(config.decode_limits, 1) as started:
        yield started
