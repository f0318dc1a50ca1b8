"""Deploy-time helper: answers the stack's custom resources.

- `Custom::DefaultNetwork`: the region's default VPC and its default subnets, where the GPU instances
  run when the deployer names no `VpcId`/`SubnetIds`.
- `Custom::WorkerImage`, `Custom::QueryImage`: starts a build of the image in the stack's CodeBuild
  project. The build answers CloudFormation itself once the image is pushed, since a build outlasts
  a Lambda invocation.

Every request gets an answer, from here or from the build: a custom resource left unanswered holds
the stack until its ServiceTimeout.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any, Literal

import boto3
from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.typing import LambdaContext

from clip_shared.network import NetworkError, default_network

IMAGE_RESOURCES = frozenset({"Custom::WorkerImage", "Custom::QueryImage"})
# CloudFormation refuses a response larger than 4 KB; the reason is the part that can grow.
MAX_REASON_CHARS = 1000

logger = Logger()


class DeployError(Exception):
    """A request the helper cannot fulfil. `code` is stable; the message tells the deployer what to do."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def start_image_build(codebuild: Any, event: dict[str, Any]) -> str:
    """Starts the build that pushes the image and then answers `event`; returns the build's id."""
    properties = event["ResourceProperties"]
    variables = {
        # The layer, not its download URL: the build asks Lambda for a URL when it starts. A URL taken
        # here is valid for 10 minutes, and a build queued behind the other image's (an account allowed
        # one concurrent build) starts 15-25 minutes later.
        "SOURCE_LAYER_ARN": properties["Source"],
        "DOCKERFILE": properties["Dockerfile"],
        "REPOSITORY_URI": properties["RepositoryUri"],
        "CLIP_MODEL": properties["ClipModel"],
        "CLIP_PRETRAINED": properties["ClipPretrained"],
        "CFN_RESPONSE_URL": event["ResponseURL"],
        "CFN_STACK_ID": event["StackId"],
        "CFN_REQUEST_ID": event["RequestId"],
        "CFN_LOGICAL_ID": event["LogicalResourceId"],
    }
    build = codebuild.start_build(
        projectName=properties["Project"],
        environmentVariablesOverride=[{"name": name, "value": value, "type": "PLAINTEXT"} for name, value in variables.items()],
    )["build"]
    return str(build["id"])


def respond(
    event: dict[str, Any],
    status: Literal["SUCCESS", "FAILED"],
    reason: str = "",
    data: dict[str, str] | None = None,
    physical_id: str | None = None,
) -> None:
    """Answers CloudFormation through the request's presigned URL."""
    body = {
        "Status": status,
        "Reason": reason[:MAX_REASON_CHARS] or "see the DeployHelper function's log",
        "PhysicalResourceId": physical_id or event.get("PhysicalResourceId") or event["LogicalResourceId"],
        "StackId": event["StackId"],
        "RequestId": event["RequestId"],
        "LogicalResourceId": event["LogicalResourceId"],
        "Data": data or {},
    }
    # The presigned URL is signed for an empty Content-Type.
    request = urllib.request.Request(
        event["ResponseURL"], data=json.dumps(body).encode(), method="PUT", headers={"Content-Type": ""}
    )
    with urllib.request.urlopen(request, timeout=30):
        pass


@logger.inject_lambda_context
def handler(event: dict[str, Any], context: LambdaContext) -> None:
    # The response URL is a credential for this request: it stays out of the log.
    logger.info(
        "custom resource request", extra={"request": {key: value for key, value in event.items() if key != "ResponseURL"}}
    )
    try:
        if event["RequestType"] == "Delete":
            # Nothing to undo: images go with their repository, and the default VPC is not the stack's.
            respond(event, "SUCCESS")
        elif event["ResourceType"] == "Custom::DefaultNetwork":
            network = default_network(boto3.client("ec2"))
            respond(
                event,
                "SUCCESS",
                data={"VpcId": network.vpc_id, "SubnetIds": ",".join(network.subnet_ids)},
                physical_id=network.vpc_id,
            )
        elif event["ResourceType"] in IMAGE_RESOURCES:
            build_id = start_image_build(boto3.client("codebuild"), event)
            logger.info("image build started; the build answers CloudFormation", extra={"build_id": build_id})
        else:
            raise DeployError("unknown-resource-type", f"the deploy helper does not serve {event['ResourceType']}")
    except (DeployError, NetworkError) as exc:
        logger.warning("request refused", extra={"code": exc.code, "reason": str(exc)})
        respond(event, "FAILED", reason=f"{exc.code}: {exc}")
    except Exception as exc:
        logger.exception("request failed")
        respond(event, "FAILED", reason=f"{type(exc).__name__}: {exc}")
