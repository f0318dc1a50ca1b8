"""The deploy helper (functions/deploy_helper) answering CloudFormation's custom-resource requests.

AWS is moto; CloudFormation's presigned response URL is a real HTTP server on loopback that keeps
what the helper PUTs, so each test sees the answer CloudFormation would get.
"""

from __future__ import annotations

import importlib.util
import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import pytest
from moto import mock_aws

from clip_pipeline.local import LambdaContext

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "clip-pipeline-ImageBuild"
LAYER_ARN = "arn:aws:lambda:us-east-1:123456789012:layer:ImageSource:3"
REPOSITORY = "123456789012.dkr.ecr.us-east-1.amazonaws.com/clip-pipeline-workerrepository"


class CloudFormationEndpoint:
    """Stands where CloudFormation's presigned S3 URL does: keeps every response PUT to it."""

    def __init__(self) -> None:
        self.responses: list[dict[str, Any]] = []
        self.content_types: list[str | None] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                endpoint.responses.append(json.loads(body))
                endpoint.content_types.append(self.headers.get("Content-Type"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/response?X-Amz-Signature=secret"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def cloudformation() -> Iterator[CloudFormationEndpoint]:
    endpoint = CloudFormationEndpoint()
    yield endpoint
    endpoint.server.shutdown()


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "deploy-helper")
    with mock_aws():
        yield


@pytest.fixture
def helper(aws: None) -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_helper_app", ROOT / "functions" / "deploy_helper" / "app.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def started_builds() -> Iterator[list[dict[str, Any]]]:
    """The StartBuild requests sent to CodeBuild, as sent (moto's build record drops the variables)."""
    requests: list[dict[str, Any]] = []
    boto3.setup_default_session()
    boto3.DEFAULT_SESSION.events.register(
        "provide-client-params.codebuild.StartBuild", lambda params, **_: requests.append(dict(params))
    )
    yield requests
    boto3.DEFAULT_SESSION = None


def request(
    endpoint: CloudFormationEndpoint, resource_type: str, request_type: str = "Create", **properties: str
) -> dict[str, Any]:
    event = {
        "RequestType": request_type,
        "ServiceToken": "arn:aws:lambda:us-east-1:123456789012:function:clip-pipeline-DeployHelper",
        "ResponseURL": endpoint.url,
        "StackId": "arn:aws:cloudformation:us-east-1:123456789012:stack/clip-pipeline/1b2c",
        "RequestId": "5d3e0b9c-request",
        "LogicalResourceId": resource_type.removeprefix("Custom::"),
        "ResourceType": resource_type,
        "ResourceProperties": {
            "ServiceToken": "arn:aws:lambda:us-east-1:123456789012:function:clip-pipeline-DeployHelper",
            **properties,
        },
    }
    if request_type != "Create":
        event["PhysicalResourceId"] = "vpc-previous"
    return event


def invoke(helper: ModuleType, event: dict[str, Any]) -> None:
    helper.handler(event, LambdaContext("clip-pipeline-DeployHelper", timeout_s=60))


def image_request(endpoint: CloudFormationEndpoint, resource_type: str = "Custom::WorkerImage") -> dict[str, Any]:
    return request(
        endpoint,
        resource_type,
        Project=PROJECT,
        Source=LAYER_ARN,
        Dockerfile="batch_job/Dockerfile",
        RepositoryUri=REPOSITORY,
        ClipModel="ViT-B-32",
        ClipPretrained="openai",
    )


def create_project() -> None:
    role = boto3.client("iam").create_role(RoleName="image-build", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    boto3.client("codebuild").create_project(
        name=PROJECT,
        # moto wants a source location, which the real project (NO_SOURCE) has none of.
        source={"type": "S3", "location": "artifacts/source.zip"},
        artifacts={"type": "NO_ARTIFACTS"},
        environment={
            "type": "LINUX_CONTAINER",
            "image": "aws/codebuild/amazonlinux-x86_64-standard:5.0",
            "computeType": "BUILD_GENERAL1_LARGE",
        },
        serviceRole=role,
    )


def test_the_default_network_is_the_default_vpc_and_its_default_subnets(
    helper: ModuleType, cloudformation: CloudFormationEndpoint
) -> None:
    ec2 = boto3.client("ec2")
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    defaults = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"]
    # A subnet someone added to the default VPC is not one the instances should land in.
    ec2.create_subnet(VpcId=vpc, CidrBlock="172.31.200.0/24")

    invoke(helper, request(cloudformation, "Custom::DefaultNetwork"))

    [response] = cloudformation.responses
    assert (response["Status"], response["PhysicalResourceId"], response["Data"]["VpcId"]) == ("SUCCESS", vpc, vpc)
    assert sorted(response["Data"]["SubnetIds"].split(",")) == sorted(subnet["SubnetId"] for subnet in defaults)
    assert (response["RequestId"], response["LogicalResourceId"]) == ("5d3e0b9c-request", "DefaultNetwork")
    # The URL is presigned for an empty Content-Type; any other makes S3 refuse the answer.
    assert cloudformation.content_types == [""]


def test_a_region_without_a_default_vpc_fails_the_resource_saying_what_to_deploy_with(
    helper: ModuleType, cloudformation: CloudFormationEndpoint
) -> None:
    ec2 = boto3.client("ec2")
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    for subnet in ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"]:
        ec2.delete_subnet(SubnetId=subnet["SubnetId"])
    ec2.delete_vpc(VpcId=vpc)

    invoke(helper, request(cloudformation, "Custom::DefaultNetwork"))

    [response] = cloudformation.responses
    assert response["Status"] == "FAILED"
    assert response["Reason"].startswith("no-default-vpc: ")
    assert "VpcId and SubnetIds" in response["Reason"]


def test_an_image_request_starts_a_build_that_fetches_its_own_source_and_answers_cloudformation(
    helper: ModuleType, cloudformation: CloudFormationEndpoint, started_builds: list[dict[str, Any]]
) -> None:
    create_project()
    event = image_request(cloudformation)

    invoke(helper, event)

    # The build answers when the image is pushed; an answer from here would complete the resource
    # before the image exists.
    assert cloudformation.responses == []
    [started] = started_builds
    assert started["projectName"] == PROJECT
    variables = {item["name"]: item["value"] for item in started["environmentVariablesOverride"]}
    # The layer itself, not a download URL that expires while the build waits in CodeBuild's queue.
    assert variables["SOURCE_LAYER_ARN"] == LAYER_ARN
    assert variables["CFN_RESPONSE_URL"] == event["ResponseURL"]
    assert (variables["CFN_STACK_ID"], variables["CFN_REQUEST_ID"], variables["CFN_LOGICAL_ID"]) == (
        event["StackId"],
        event["RequestId"],
        "WorkerImage",
    )
    assert (variables["DOCKERFILE"], variables["REPOSITORY_URI"], variables["CLIP_MODEL"], variables["CLIP_PRETRAINED"]) == (
        "batch_job/Dockerfile",
        REPOSITORY,
        "ViT-B-32",
        "openai",
    )
    assert len(boto3.client("codebuild").list_builds_for_project(projectName=PROJECT)["ids"]) == 1


def test_a_build_that_cannot_start_fails_the_resource_at_once(helper: ModuleType, cloudformation: CloudFormationEndpoint) -> None:
    invoke(helper, image_request(cloudformation, "Custom::QueryImage"))  # no such project

    [response] = cloudformation.responses
    assert response["Status"] == "FAILED"
    assert "ResourceNotFoundException" in response["Reason"] and PROJECT in response["Reason"]
    assert response["PhysicalResourceId"] == "QueryImage"


def test_deletes_succeed_without_touching_anything(
    helper: ModuleType, cloudformation: CloudFormationEndpoint, started_builds: list[dict[str, Any]]
) -> None:
    create_project()
    for event in (
        request(cloudformation, "Custom::DefaultNetwork", "Delete"),
        {**image_request(cloudformation), "RequestType": "Delete", "PhysicalResourceId": f"{REPOSITORY}:0123"},
    ):
        invoke(helper, event)

    assert [(r["Status"], r["PhysicalResourceId"]) for r in cloudformation.responses] == [
        ("SUCCESS", "vpc-previous"),
        ("SUCCESS", f"{REPOSITORY}:0123"),
    ]
    assert started_builds == []


def test_an_unknown_resource_type_fails_naming_it(helper: ModuleType, cloudformation: CloudFormationEndpoint) -> None:
    invoke(helper, request(cloudformation, "Custom::Something"))

    [response] = cloudformation.responses
    assert (response["Status"], response["Reason"]) == (
        "FAILED",
        "unknown-resource-type: the deploy helper does not serve Custom::Something",
    )


def test_the_response_url_never_reaches_the_log(helper: ModuleType, cloudformation: CloudFormationEndpoint) -> None:
    logs = io.StringIO()
    # The JSON log lines, however pytest captures the stream the logger was created with.
    previous = helper.logger.registered_handler.setStream(logs)
    try:
        invoke(helper, request(cloudformation, "Custom::DefaultNetwork"))
    finally:
        helper.logger.registered_handler.setStream(previous)

    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    [logged] = [line for line in lines if line["message"] == "custom resource request"]
    assert logged["request"]["ResourceType"] == "Custom::DefaultNetwork"
    assert logged["service"] == "deploy-helper"
    assert "X-Amz-Signature" not in logs.getvalue()
