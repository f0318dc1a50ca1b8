"""The defaults every part of the pipeline shares. template.yaml's parameter defaults repeat them for
CloudFormation, and tests/test_template.py checks that the two agree."""

from __future__ import annotations

#: The open_clip model and weights the pipeline embeds with unless told otherwise.
MODEL = "ViT-B-32"
PRETRAINED = "openai"
#: Larger uploads are rejected before anyone downloads them.
MAX_OBJECT_BYTES = 50 * 1024 * 1024
#: Images each array child embeds.
SHARD_SIZE = 1000
