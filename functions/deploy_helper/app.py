"""Deploy-time helper: answers the stack's custom resources, and their image builds when they end.

- `Custom::DefaultNetwork`: the region's default VPC and those of its default subnets in zones that
  offer the GPU instance types, where the instances run when the deployer names no `VpcId`/`SubnetIds`.
- `Custom::WorkerImage`, `Custom::QueryImage`: the image for the resource's properties. One already
  pushed for them (a redeploy, or a rollback to the previous source) answers at once; otherwise a
  build of the stack's CodeBuild project starts, and its end answers: EventBridge sends every final
  state of a build of the project (CodeBuild Build State Change) here, whatever phase it ended in
  (queued past its timeout, failed to provision, failed, stopped, timed out, or succeeded).

Every request gets an answer: a custom resource left unanswered holds the stack until its
ServiceTimeout. The request's response URL (a presigned credential for it) waits in an SSM
SecureString parameter that only this function's role may read, never in the build's environment,
which `BatchGetBuilds` and the build's events show to anyone who may read the project.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from typing import Any, Literal

import boto3
from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import ClientError

from clip_shared.network import NetworkError, default_network

IMAGE_RESOURCES = frozenset({"Custom::WorkerImage", "Custom::QueryImage"})
#: What an image is built from: its request tag digests these, and nothing else of the request.
IMAGE_INPUTS = ("Source", "Dockerfile", "ClipModel", "ClipPretrained")
#: A build in any of these states has ended (CodeBuild's StatusType less IN_PROGRESS).
FINAL_BUILD_STATES = frozenset({"SUCCEEDED", "FAILED", "FAULT", "STOPPED", "TIMED_OUT"})
#: What the build's end needs of the CloudFormation request to answer it.
PENDING_KEYS = ("ResponseURL", "StackId", "RequestId", "LogicalResourceId", "PhysicalResourceId")
# CloudFormation refuses a response larger than 4 KB; the reason is the part that can grow.
MAX_REASON_CHARS = 1000

logger = Logger()


class DeployError(Exception):
    """A request the helper cannot fulfil. `code` is stable; the message tells the deployer what to do."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def request_tag(properties: dict[str, Any]) -> str:
    """The tag that names the image built for these properties, whatever its content tag.

    A layer version's ARN is never reused, so the same tag means the same source; a rollback's
    Update, which asks again for the previous properties, finds that image by it.
    """
    inputs = json.dumps([str(properties[name]) for name in IMAGE_INPUTS])
    return "request-" + hashlib.sha256(inputs.encode()).hexdigest()[:16]


def pushed_image(ecr: Any, repository_uri: str, tag: str) -> str | None:
    """`repository:content-tag` of the image tagged `tag`, or None when the repository has none."""
    try:
        [image] = ecr.describe_images(repositoryName=repository_uri.split("/", 1)[1], imageIds=[{"imageTag": tag}])[
            "imageDetails"
        ]
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "ImageNotFoundException":
            return None
        raise
    content = sorted(name for name in image.get("imageTags", []) if not name.startswith("request-"))
    return f"{repository_uri}:{content[0]}" if content else f"{repository_uri}@{image['imageDigest']}"


def pending_parameter(event: dict[str, Any]) -> str:
    return f"{os.environ['IMAGE_REQUESTS_PATH']}{event['RequestId']}"


def _keep(ssm: Any, parameter: str, pending: dict[str, Any]) -> None:
    ssm.put_parameter(
        Name=parameter,
        Description="A CloudFormation request the deploy helper answers when its image build ends",
        Type="SecureString",
        Value=json.dumps(pending),
        Overwrite=True,
    )


def start_image_build(codebuild: Any, ssm: Any, event: dict[str, Any]) -> str:
    """Keeps what answering `event` needs, and starts the build whose end answers it; returns the build's id.

    What the answer depends on (the repository, the tag to find the image by, the build's id) is kept
    with the request, not taken from the build's end event: only the build started for a request
    answers it, with the image it was asked for.
    """
    properties = event["ResourceProperties"]
    parameter = pending_parameter(event)
    pending = {
        **{key: event[key] for key in PENDING_KEYS if key in event},
        "RepositoryUri": properties["RepositoryUri"],
        "RequestTag": request_tag(properties),
        "Dockerfile": properties["Dockerfile"],
    }
    # Kept before the build starts: its end may come before this function returns.
    _keep(ssm, parameter, pending)
    variables = {
        # The layer, not its download URL: the build asks Lambda for a URL when it starts. A URL taken
        # here is valid for 10 minutes, and a build may wait longer than that in CodeBuild's queue.
        "SOURCE_LAYER_ARN": properties["Source"],
        "DOCKERFILE": properties["Dockerfile"],
        "REPOSITORY_URI": properties["RepositoryUri"],
        "CLIP_MODEL": properties["ClipModel"],
        "CLIP_PRETRAINED": properties["ClipPretrained"],
        "REQUEST_TAG": request_tag(properties),
        # The parameter's name, not its value: the build never reads it; its end event brings it back here.
        "CFN_REQUEST_PARAMETER": parameter,
    }
    try:
        build = codebuild.start_build(
            projectName=properties["Project"],
            environmentVariablesOverride=[
                {"name": name, "value": value, "type": "PLAINTEXT"} for name, value in variables.items()
            ],
        )["build"]
    except ClientError as exc:
        ssm.delete_parameter(Name=parameter)
        if exc.response["Error"]["Code"] == "AccountLimitExceededException":
            raise DeployError(
                "codebuild-quota",
                f"CodeBuild refused the {properties['Dockerfile']} image build ({exc.response['Error'].get('Message', '')}): "
                "the account may run no build at all. Request the quota `clip-pipeline preflight` "
                "names (codebuild-builds), or deploy with ImageUri and QueryImageUri (scripts/build-and-push.sh)",
            ) from exc
        raise
    _keep(ssm, parameter, {**pending, "BuildId": build["id"]})
    return str(build["id"])


def answer_image_request(event: dict[str, Any]) -> None:
    properties = event["ResourceProperties"]
    image = pushed_image(boto3.client("ecr"), properties["RepositoryUri"], request_tag(properties))
    if image:
        logger.info("the image is already in the repository", extra={"image": image})
        respond(event, "SUCCESS", reason=f"{image} was already built", data={"ImageUri": image}, physical_id=image)
        return
    build_id = start_image_build(boto3.client("codebuild"), boto3.client("ssm"), event)
    logger.info("image build started; its end answers CloudFormation", extra={"build_id": build_id})


def build_ended(event: dict[str, Any]) -> None:
    """Answers the request a build of the image project was started for, from the build's final state."""
    detail = event["detail"]
    status = detail["build-status"]
    if status not in FINAL_BUILD_STATES:
        logger.info("the build has not ended", extra={"status": status})
        return
    information = detail.get("additional-information", {})
    variables = {item["name"]: item["value"] for item in information.get("environment", {}).get("environment-variables", [])}
    parameter = variables.get("CFN_REQUEST_PARAMETER", "")
    if not parameter.startswith(os.environ["IMAGE_REQUESTS_PATH"]):
        logger.info("a build the deploy helper did not start", extra={"build_id": detail.get("build-id")})
        return
    ssm = boto3.client("ssm")
    try:
        pending = json.loads(ssm.get_parameter(Name=parameter, WithDecryption=True)["Parameter"]["Value"])
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ParameterNotFound":
            raise
        # EventBridge delivers at least once: an earlier delivery answered and removed it.
        logger.info("the request was answered already", extra={"build_id": detail.get("build-id")})
        return
    build_id = pending.get("BuildId")
    # The event names the build by its ARN (arn:...:build/<project>:<uuid>), StartBuild by <project>:<uuid>.
    if build_id and detail.get("build-id", "").rsplit("build/", 1)[-1] != build_id:
        # Another build of the project naming this request (started by hand with its variables):
        # the request waits for its own build.
        logger.warning("a build not started for this request", extra={"build_id": detail.get("build-id"), "started": build_id})
        return
    image = pushed_image(boto3.client("ecr"), pending["RepositoryUri"], pending["RequestTag"]) if status == "SUCCEEDED" else None
    where = information.get("logs", {}).get("deep-link") or detail.get("build-id", "")
    if image:
        respond(pending, "SUCCESS", reason=f"{image} built: {where}", data={"ImageUri": image}, physical_id=image)
    else:
        why = (
            f"{status} ({failed_phase(information) or detail.get('current-phase', '')})"
            if status != "SUCCEEDED"
            else f"SUCCEEDED without pushing an image tagged {pending['RequestTag']}"
        )
        respond(pending, "FAILED", reason=f"{pending['Dockerfile']} image build {why}: {where}")
    ssm.delete_parameter(Name=parameter)
    logger.info("answered the image request", extra={"status": status, "image": image})


def failed_phase(information: dict[str, Any]) -> str:
    """The phase a build ended in without success, with CodeBuild's words for why (QUEUED: TIMED_OUT...)."""
    for phase in information.get("phases", []):
        if phase.get("phase-status") not in (None, "SUCCEEDED"):
            context = "; ".join(item for item in phase.get("phase-context") or [] if item)
            return f"{phase['phase-type']}: {phase['phase-status']}" + (f": {context}" if context else "")
    return ""


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


def custom_resource(event: dict[str, Any]) -> None:
    # The response URL is a credential for this request: it stays out of the log.
    logger.info(
        "custom resource request", extra={"request": {key: value for key, value in event.items() if key != "ResponseURL"}}
    )
    try:
        if event["RequestType"] == "Delete":
            # Nothing to undo: images go with their repository, and the default VPC is not the stack's.
            respond(event, "SUCCESS")
        elif event["ResourceType"] == "Custom::DefaultNetwork":
            instance_types = event["ResourceProperties"].get("InstanceTypes", [])
            network = default_network(boto3.client("ec2"), instance_types)
            respond(
                event,
                "SUCCESS",
                data={"VpcId": network.vpc_id, "SubnetIds": ",".join(network.subnet_ids)},
                physical_id=network.vpc_id,
            )
        elif event["ResourceType"] in IMAGE_RESOURCES:
            answer_image_request(event)
        else:
            raise DeployError("unknown-resource-type", f"the deploy helper does not serve {event['ResourceType']}")
    except (DeployError, NetworkError) as exc:
        logger.warning("request refused", extra={"code": exc.code, "reason": str(exc)})
        respond(event, "FAILED", reason=f"{exc.code}: {exc}")
    except Exception as exc:
        logger.exception("request failed")
        respond(event, "FAILED", reason=f"{type(exc).__name__}: {exc}")


@logger.inject_lambda_context
def handler(event: dict[str, Any], context: LambdaContext) -> None:
    if event.get("detail-type") == "CodeBuild Build State Change":
        # Failing here makes Lambda retry the delivery (twice), while the request stays answerable.
        build_ended(event)
    else:
        custom_resource(event)
