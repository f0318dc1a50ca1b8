"""The worker's one logger: JSON lines on stdout, ready for CloudWatch Logs Insights."""

from __future__ import annotations

import logging

from aws_lambda_powertools import Logger

logger = Logger(service="clip-worker")
# Powertools writes the JSON lines itself; a handler that open_clip's root-level logging calls add
# later (logging.basicConfig) would print every line a second time, unformatted, on stderr.
logging.getLogger(logger.name).propagate = False
