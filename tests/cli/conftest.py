from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from clip_pipeline import emulator
from clip_pipeline.stack import Clients, Stack, read_stack
from tests.support import TINY_MODEL

SHARD_SIZE = 2


@pytest.fixture(scope="module")
def deployed(request: pytest.FixtureRequest, tiny_config: Path, tiny_checkpoint: Path) -> Iterator[tuple[Clients, Stack]]:
    """template.yaml deployed in an embedded emulator, with the tiny model as the stack's model.

    Each test module gets a stack of its own name: moto keeps every emulator's resources in the process.
    """
    stack_name = f"clip-{request.module.__name__.rsplit('.', 1)[-1].replace('_', '-')}"
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            patch.setenv(name, "testing")
        patch.setenv("AWS_DEFAULT_REGION", emulator.REGION)
        with emulator.running() as clients:
            emulator.deploy(
                clients,
                stack_name,
                {
                    "ImageUri": "local/x:1",
                    "ClipModel": TINY_MODEL,
                    "ClipPretrained": str(tiny_checkpoint),
                    "ShardSize": str(SHARD_SIZE),
                },
            )
            yield clients, read_stack(clients, stack_name)
