"""A moto account holding what the stack deploys, and the dispatcher handler.

The handler is loaded from functions/dispatcher/app.py under its own module name (every function
has an app.py) with the environment template.yaml gives it, and is invoked with events/*.json.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import boto3
import pytest
from dispatcher_support import (
    INPUT_BUCKET,
    JOB_DEFINITION,
    JOB_QUEUE,
    MAX_OBJECT_BYTES,
    OUTPUT_BUCKET,
    OUTPUT_PREFIX,
    ROOT,
    SHARD_SIZE,
    FakeLambdaContext,
)
from moto import mock_aws

ENVIRONMENT = {
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "OUTPUT_BUCKET": OUTPUT_BUCKET,
    "OUTPUT_PREFIX": OUTPUT_PREFIX,
    "JOB_QUEUE": JOB_QUEUE,
    "JOB_DEFINITION": JOB_DEFINITION,
    "SHARD_SIZE": str(SHARD_SIZE),
    "MAX_OBJECT_BYTES": str(MAX_OBJECT_BYTES),
    "POWERTOOLS_SERVICE_NAME": "dispatcher",
    "POWERTOOLS_METRICS_NAMESPACE": "ClipPipeline",
    "POWERTOOLS_TRACE_DISABLED": "true",
}


@pytest.fixture(scope="module", autouse=True)
def environment() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in ENVIRONMENT.items():
            patch.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS"):
            patch.delenv(name, raising=False)
        yield


@pytest.fixture(scope="module")
def app(environment: None) -> ModuleType:
    spec = importlib.util.spec_from_file_location("dispatcher_app", ROOT / "functions" / "dispatcher" / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def aws(environment: None) -> Iterator[None]:
    """The buckets, job queue and job definition the stack creates, in a fresh moto account."""
    with mock_aws(config={"batch": {"use_docker": False}}):
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=INPUT_BUCKET)
        s3.put_bucket_versioning(Bucket=INPUT_BUCKET, VersioningConfiguration={"Status": "Enabled"})
        s3.create_bucket(Bucket=OUTPUT_BUCKET)
        role = boto3.client("iam").create_role(RoleName="batch", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
        batch = boto3.client("batch")
        environment_arn = batch.create_compute_environment(
            computeEnvironmentName="gpu", type="UNMANAGED", state="ENABLED", serviceRole=role
        )["computeEnvironmentArn"]
        batch.create_job_queue(
            jobQueueName=JOB_QUEUE,
            state="ENABLED",
            priority=1,
            computeEnvironmentOrder=[{"order": 1, "computeEnvironment": environment_arn}],
        )
        batch.register_job_definition(
            jobDefinitionName=JOB_DEFINITION,
            type="container",
            containerProperties={
                "image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/clip-worker:test",
                "command": ["python", "-m", "clip_worker"],
                "resourceRequirements": [
                    {"type": "VCPU", "value": "4"},
                    {"type": "MEMORY", "value": "15000"},
                    {"type": "GPU", "value": "1"},
                ],
            },
        )
        yield


@pytest.fixture
def invoke(app: ModuleType, aws: None) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def _invoke(event: dict[str, Any]) -> dict[str, Any]:
        return app.lambda_handler(event, FakeLambdaContext())

    return _invoke
