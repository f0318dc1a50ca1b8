"""The deploy helper (functions/deploy_helper) answering CloudFormation's custom-resource requests, and
the ends of the image builds it starts.

AWS is moto; CloudFormation's presigned response URL is a real HTTP server on loopback that keeps
what the helper PUTs, so each test sees the answer CloudFormation would get. A build's end is the
event EventBridge delivers (CodeBuild Build State Change, as CodeBuild's "build notifications input
format reference" documents it), carrying the environment variables the helper started the build with.
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
from botocore.awsrequest import AWSResponse
from moto import mock_aws

from clip_pipeline.local import LambdaContext

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "clip-pipeline-ImageBuild"
LAYER_ARN = "arn:aws:lambda:us-east-1:123456789012:layer:ImageSource:3"
REPOSITORY_NAME = "clip-pipeline-workerrepository"
REPOSITORY = f"123456789012.dkr.ecr.us-east-1.amazonaws.com/{REPOSITORY_NAME}"
REQUESTS_PATH = "/clip-pipeline/image-requests/"


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
    monkeypatch.setenv("IMAGE_REQUESTS_PATH", REQUESTS_PATH)
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
    endpoint: CloudFormationEndpoint, resource_type: str, request_type: str = "Create", **properties: Any
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


def image_request(
    endpoint: CloudFormationEndpoint, resource_type: str = "Custom::WorkerImage", request_type: str = "Create", **changed: str
) -> dict[str, Any]:
    properties = {
        "Project": PROJECT,
        "Source": LAYER_ARN,
        "Dockerfile": "batch_job/Dockerfile",
        "RepositoryUri": REPOSITORY,
        "ClipModel": "ViT-B-32",
        "ClipPretrained": "openai",
        **changed,
    }
    event = request(endpoint, resource_type, request_type, **properties)
    if request_type == "Update":
        event["PhysicalResourceId"] = f"{REPOSITORY}:previous"
        event["OldResourceProperties"] = {**event["ResourceProperties"], "Source": LAYER_ARN.replace(":3", ":2")}
    return event


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
    boto3.client("ecr").create_repository(repositoryName=REPOSITORY_NAME)


def push(*tags: str) -> None:
    """An image pushed to the repository under `tags` (what scripts/push-image.sh leaves)."""
    ecr = boto3.client("ecr")
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "size": 7023,
                "digest": "sha256:" + "c" * 64,
            },
            "layers": [],
        }
    )
    for tag in tags:
        ecr.put_image(repositoryName=REPOSITORY_NAME, imageManifest=manifest, imageTag=tag)


def build_ended(
    started: dict[str, Any], status: str, phases: list[tuple[str, str, list[str]]], build_id: str | None = None
) -> dict[str, Any]:
    """The event EventBridge delivers when a build ends (by default, the project's latest build):
    CodeBuild echoes the build's environment variables."""
    if build_id is None:
        [latest, *_] = boto3.client("codebuild").list_builds_for_project(projectName=PROJECT, sortOrder="DESCENDING")["ids"]
        build_id = f"arn:aws:codebuild:us-east-1:123456789012:build/{latest}"
    stream = build_id.rsplit(":", 1)[1]
    return {
        "version": "0",
        "id": "c030038d-8c4d-6141-9545-00ff7b7153EX",
        "detail-type": "CodeBuild Build State Change",
        "source": "aws.codebuild",
        "account": "123456789012",
        "time": "2026-12-06T16:14:28Z",
        "region": "us-east-1",
        "resources": [build_id],
        "detail": {
            "build-status": status,
            "project-name": PROJECT,
            "build-id": build_id,
            "additional-information": {
                "environment": {
                    "image": "aws/codebuild/amazonlinux-x86_64-standard:5.0",
                    "privileged-mode": True,
                    "compute-type": "BUILD_GENERAL1_LARGE",
                    "type": "LINUX_CONTAINER",
                    "environment-variables": started["environmentVariablesOverride"],
                },
                "timeout-in-minutes": 45,
                "queued-timeout-in-minutes": 10,
                "build-complete": True,
                "initiator": "clip-pipeline-DeployHelper",
                "build-start-time": "Dec 6, 2026 4:12:29 PM",
                "source": {"type": "NO_SOURCE"},
                "logs": {
                    "group-name": f"/aws/codebuild/{PROJECT}",
                    "stream-name": stream,
                    "deep-link": f"https://console.aws.amazon.com/cloudwatch/home?region=us-east-1#logEvent:group=/aws/codebuild/{PROJECT};stream={stream}",
                },
                "phases": [
                    {
                        "phase-context": context,
                        "start-time": "Dec 6, 2026 4:12:29 PM",
                        "end-time": "Dec 6, 2026 4:13:05 PM",
                        "duration-in-seconds": 36,
                        "phase-type": phase,
                        "phase-status": phase_status,
                    }
                    for phase, phase_status, context in phases
                ]
                + [{"start-time": "Dec 6, 2026 4:13:05 PM", "phase-type": "COMPLETED"}],
            },
            "current-phase": "COMPLETED",
            "current-phase-context": "[]",
            "version": "1",
        },
    }


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


def test_default_subnets_are_only_those_in_zones_that_offer_the_instance_types(
    helper: ModuleType, cloudformation: CloudFormationEndpoint
) -> None:
    ec2 = boto3.client("ec2")
    offered = {
        offering["Location"]
        for offering in ec2.describe_instance_type_offerings(
            LocationType="availability-zone", Filters=[{"Name": "instance-type", "Values": ["g4dn.xlarge"]}]
        )["InstanceTypeOfferings"]
    }
    subnets = ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
    # The emulated us-east-1, like the real one, has a zone without g4dn (us-east-1e).
    assert {subnet["AvailabilityZone"] for subnet in subnets} - offered

    invoke(helper, request(cloudformation, "Custom::DefaultNetwork", InstanceTypes=["g4dn.xlarge"]))
    invoke(helper, request(cloudformation, "Custom::DefaultNetwork", InstanceTypes=["g4dn"]))

    for response in cloudformation.responses:
        assert response["Status"] == "SUCCESS"
        assert sorted(response["Data"]["SubnetIds"].split(",")) == sorted(
            subnet["SubnetId"] for subnet in subnets if subnet["AvailabilityZone"] in offered
        )


def test_instance_types_no_zone_offers_fail_the_network_at_once(
    helper: ModuleType, cloudformation: CloudFormationEndpoint
) -> None:
    invoke(helper, request(cloudformation, "Custom::DefaultNetwork", InstanceTypes=["g9zz.xlarge"]))

    [response] = cloudformation.responses
    assert response["Status"] == "FAILED" and response["Reason"].startswith("no-zone-offers-instance-types: ")
    assert "g9zz.xlarge" in response["Reason"]


def test_an_image_request_starts_a_build_that_never_sees_the_response_url(
    helper: ModuleType, cloudformation: CloudFormationEndpoint, started_builds: list[dict[str, Any]]
) -> None:
    create_project()
    event = image_request(cloudformation)

    invoke(helper, event)

    # The build's end answers; an answer now would complete the resource before the image exists.
    assert cloudformation.responses == []
    [started] = started_builds
    assert started["projectName"] == PROJECT
    variables = {item["name"]: item for item in started["environmentVariablesOverride"]}
    # The layer itself, not a download URL that expires while the build waits in CodeBuild's queue.
    assert variables["SOURCE_LAYER_ARN"]["value"] == LAYER_ARN
    assert (variables["DOCKERFILE"]["value"], variables["REPOSITORY_URI"]["value"]) == ("batch_job/Dockerfile", REPOSITORY)
    assert (variables["CLIP_MODEL"]["value"], variables["CLIP_PRETRAINED"]["value"]) == ("ViT-B-32", "openai")
    # Every variable is shown by BatchGetBuilds and the build's events: the response URL is in none.
    assert "X-Amz-Signature" not in json.dumps(started)
    parameter = boto3.client("ssm").get_parameter(Name=variables["CFN_REQUEST_PARAMETER"]["value"], WithDecryption=True)
    assert parameter["Parameter"]["Type"] == "SecureString"
    assert json.loads(parameter["Parameter"]["Value"])["ResponseURL"] == event["ResponseURL"]
    assert variables["CFN_REQUEST_PARAMETER"]["value"].startswith(REQUESTS_PATH)


@pytest.mark.parametrize(
    ("status", "phases", "reason"),
    [
        # The compute could not be provisioned (e.g. the service role may not pull the build image).
        (
            "FAILED",
            [
                ("SUBMITTED", "SUCCEEDED", []),
                ("QUEUED", "SUCCEEDED", []),
                ("PROVISIONING", "FAILED", ["CLIENT_ERROR: cannot pull"]),
            ],
            "FAILED (PROVISIONING: FAILED: CLIENT_ERROR: cannot pull)",
        ),
        # Waited in the queue past QueuedTimeoutInMinutes: the account runs no build at all.
        ("TIMED_OUT", [("SUBMITTED", "SUCCEEDED", []), ("QUEUED", "TIMED_OUT", [])], "TIMED_OUT (QUEUED: TIMED_OUT)"),
        # Stopped by someone, mid-build.
        ("STOPPED", [("PROVISIONING", "SUCCEEDED", []), ("BUILD", "STOPPED", [])], "STOPPED (BUILD: STOPPED)"),
        # The docker build itself failed, or ran past TimeoutInMinutes.
        (
            "FAILED",
            [("BUILD", "FAILED", ["COMMAND_EXECUTION_ERROR: exit status 1"])],
            "FAILED (BUILD: FAILED: COMMAND_EXECUTION_ERROR",
        ),
        ("TIMED_OUT", [("BUILD", "TIMED_OUT", [])], "TIMED_OUT (BUILD: TIMED_OUT)"),
        ("FAULT", [("PROVISIONING", "FAULT", [])], "FAULT (PROVISIONING: FAULT)"),
    ],
)
def test_a_build_that_ends_without_an_image_fails_its_resource_once_whatever_phase_it_ended_in(
    helper: ModuleType,
    cloudformation: CloudFormationEndpoint,
    started_builds: list[dict[str, Any]],
    status: str,
    phases: list[tuple[str, str, list[str]]],
    reason: str,
) -> None:
    create_project()
    event = image_request(cloudformation, "Custom::QueryImage")
    invoke(helper, event)
    ended = build_ended(started_builds[0], status, phases)

    invoke(helper, ended)
    # EventBridge delivers at least once; CloudFormation takes one answer.
    invoke(helper, ended)

    [response] = cloudformation.responses
    assert response["Status"] == "FAILED"
    assert response["Reason"].startswith(f"batch_job/Dockerfile image build {reason}")
    assert f"stream={ended['resources'][0].rsplit(':', 1)[1]}" in response["Reason"]  # the build's log
    assert (response["StackId"], response["RequestId"], response["LogicalResourceId"], response["PhysicalResourceId"]) == (
        event["StackId"],
        event["RequestId"],
        "QueryImage",
        "QueryImage",
    )
    assert boto3.client("ssm").describe_parameters()["Parameters"] == []


def test_a_build_that_pushed_its_image_answers_with_the_content_tag(
    helper: ModuleType, cloudformation: CloudFormationEndpoint, started_builds: list[dict[str, Any]]
) -> None:
    create_project()
    invoke(helper, image_request(cloudformation))
    variables = {item["name"]: item["value"] for item in started_builds[0]["environmentVariablesOverride"]}
    push("0123456789abcdef", variables["REQUEST_TAG"])

    invoke(helper, build_ended(started_builds[0], "SUCCEEDED", [("BUILD", "SUCCEEDED", []), ("POST_BUILD", "SUCCEEDED", [])]))

    [response] = cloudformation.responses
    image = f"{REPOSITORY}:0123456789abcdef"
    assert (response["Status"], response["PhysicalResourceId"], response["Data"]) == ("SUCCESS", image, {"ImageUri": image})


def test_a_build_that_succeeded_without_the_image_fails_rather_than_pointing_at_nothing(
    helper: ModuleType, cloudformation: CloudFormationEndpoint, started_builds: list[dict[str, Any]]
) -> None:
    create_project()
    invoke(helper, image_request(cloudformation))

    invoke(helper, build_ended(started_builds[0], "SUCCEEDED", [("BUILD", "SUCCEEDED", [])]))

    [response] = cloudformation.responses
    assert response["Status"] == "FAILED" and "SUCCEEDED without pushing an image tagged request-" in response["Reason"]


def test_a_rollback_to_an_image_built_before_is_answered_at_once_without_a_build(
    helper: ModuleType, cloudformation: CloudFormationEndpoint, started_builds: list[dict[str, Any]]
) -> None:
    create_project()
    # The previous deploy built this image; an update failed elsewhere, and CloudFormation rolls this
    # resource back by asking for the previous properties again.
    invoke(helper, image_request(cloudformation))
    variables = {item["name"]: item["value"] for item in started_builds[0]["environmentVariablesOverride"]}
    push("0123456789abcdef", variables["REQUEST_TAG"])
    rollback = image_request(cloudformation, request_type="Update")

    invoke(helper, rollback)

    [response] = cloudformation.responses
    assert (response["Status"], response["PhysicalResourceId"]) == ("SUCCESS", f"{REPOSITORY}:0123456789abcdef")
    assert len(started_builds) == 1
    # The query image's update after a new worker image (its `After` property) is no new image either.
    invoke(helper, image_request(cloudformation, request_type="Update", After=f"{REPOSITORY}:fedcba9876543210"))
    assert len(started_builds) == 1 and cloudformation.responses[-1]["Status"] == "SUCCESS"
    del cloudformation.responses[-1]
    # Other weights are another image: they are built.
    invoke(helper, image_request(cloudformation, request_type="Update", ClipPretrained="laion2b_s34b_b79k"))
    assert len(started_builds) == 2 and len(cloudformation.responses) == 1


def test_an_update_whose_build_fails_keeps_the_previous_image(
    helper: ModuleType, cloudformation: CloudFormationEndpoint, started_builds: list[dict[str, Any]]
) -> None:
    create_project()
    invoke(helper, image_request(cloudformation, request_type="Update"))

    invoke(helper, build_ended(started_builds[0], "FAILED", [("BUILD", "FAILED", [])]))

    [response] = cloudformation.responses
    # The same physical id: CloudFormation neither replaces nor deletes the image the stack runs.
    assert (response["Status"], response["PhysicalResourceId"]) == ("FAILED", f"{REPOSITORY}:previous")


def test_a_build_codebuild_refuses_to_queue_fails_the_resource_at_once_saying_what_to_do(
    helper: ModuleType, cloudformation: CloudFormationEndpoint, started_builds: list[dict[str, Any]]
) -> None:
    create_project()

    def refuse(**_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        # What CodeBuild answers StartBuild on an account whose concurrent-build quota is 0.
        error = {"Code": "AccountLimitExceededException", "Message": "Cannot have more than 0 builds in queue for the account"}
        return AWSResponse(None, 400, {}, None), {"Error": error}

    boto3.DEFAULT_SESSION.events.register("before-call.codebuild.StartBuild", refuse)

    invoke(helper, image_request(cloudformation))

    [response] = cloudformation.responses
    assert response["Status"] == "FAILED"
    assert response["Reason"].startswith("codebuild-quota: CodeBuild refused the batch_job/Dockerfile image build")
    assert "Cannot have more than 0 builds in queue" in response["Reason"] and "ImageUri and QueryImageUri" in response["Reason"]
    assert boto3.client("ssm").describe_parameters()["Parameters"] == []


def test_a_build_that_cannot_start_fails_the_resource_at_once(helper: ModuleType, cloudformation: CloudFormationEndpoint) -> None:
    boto3.client("ecr").create_repository(repositoryName=REPOSITORY_NAME)
    invoke(helper, image_request(cloudformation, "Custom::QueryImage"))  # no such project

    [response] = cloudformation.responses
    assert response["Status"] == "FAILED"
    assert "ResourceNotFoundException" in response["Reason"] and PROJECT in response["Reason"]
    assert response["PhysicalResourceId"] == "QueryImage"


def test_the_end_of_a_build_the_helper_did_not_start_is_ignored(
    helper: ModuleType, cloudformation: CloudFormationEndpoint, started_builds: list[dict[str, Any]]
) -> None:
    create_project()
    by_hand = {"environmentVariablesOverride": [{"name": "DOCKERFILE", "value": "batch_job/Dockerfile", "type": "PLAINTEXT"}]}
    elsewhere = {
        "environmentVariablesOverride": [
            {"name": "CFN_REQUEST_PARAMETER", "value": "/another-stack/secrets/db", "type": "PLAINTEXT"},
        ]
    }

    invoke(helper, build_ended(by_hand, "FAILED", [("BUILD", "FAILED", [])], build_id="arn:aws:codebuild:::build/x:1"))
    invoke(helper, build_ended(elsewhere, "FAILED", [("BUILD", "FAILED", [])], build_id="arn:aws:codebuild:::build/x:2"))

    assert cloudformation.responses == []


def test_only_the_build_started_for_a_request_answers_it(
    helper: ModuleType, cloudformation: CloudFormationEndpoint, started_builds: list[dict[str, Any]]
) -> None:
    create_project()
    invoke(helper, image_request(cloudformation))
    [started] = started_builds
    # Someone starts another build of the project with the same variables (say, to try a fix), and it
    # fails; it names the pending request, but is not its build.
    variables = {item["name"]: item["value"] for item in started["environmentVariablesOverride"]}
    elsewhere = "arn:aws:codebuild:us-east-1:123456789012:build/" + PROJECT + ":0000-by-hand"
    invoke(helper, build_ended(started, "FAILED", [("BUILD", "FAILED", [])], build_id=elsewhere))
    assert cloudformation.responses == []

    push("0123456789abcdef", variables["REQUEST_TAG"])
    invoke(helper, build_ended(started, "SUCCEEDED", [("BUILD", "SUCCEEDED", [])]))
    [response] = cloudformation.responses
    assert (response["Status"], response["PhysicalResourceId"]) == ("SUCCESS", f"{REPOSITORY}:0123456789abcdef")
