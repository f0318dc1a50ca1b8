"""The Lambda entry point: API Gateway HTTP API events -> the FastAPI application, through Mangum.

Everything heavy happens at import, in the function's init phase: the configuration is read and the
model loaded from the weights baked into the image, so no request pays for it and none downloads.
"""

from __future__ import annotations

from typing import Any

import boto3
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.config import Config
from mangum import Mangum

from clip_query.api import create_app
from clip_query.config import QueryConfig
from clip_query.service import QueryService

logger = Logger(service="clip-query")
metrics = Metrics(service="clip-query")
tracer = Tracer(service="clip-query")

config = QueryConfig.from_env()
# Presigned preview URLs must be SigV4 to work in every region.
service = QueryService(config, boto3.client("s3", config=Config(signature_version="s3v4")))
asgi = Mangum(create_app(config, service), lifespan="off")


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics(capture_cold_start_metric=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    response = asgi(event, context)  # type: ignore[arg-type]  # Mangum declares its own LambdaContext protocol, which Powertools' class satisfies at run time
    # API Gateway's own metrics count 4xx and 5xx; these say which of them the application chose.
    metrics.add_metric(name=f"Responses{int(response['statusCode']) // 100}xx", unit=MetricUnit.Count, value=1)
    return response
