"""An embedded AWS (moto's server, in this process, on loopback) holding the stack `template.yaml` declares.

The template is translated with aws-sam-translator, exactly as CloudFormation's SAM transform
would, and created as a stack in moto's CloudFormation. Where moto's CloudFormation falls short
of AWS, the gap is filled here, on the translated copy, and each fill says which gap it is.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
from moto.cloudformation.models import cloudformation_backends
from moto.cloudformation.parsing import clean_json
from moto.server import ThreadedMotoServer
from samtranslator.translator.transform import transform
from samtranslator.yaml_helper import yaml_parse

from clip_pipeline.stack import Clients

REGION = "us-east-1"
ACCOUNT = "123456789012"
REPOSITORY = Path(__file__).resolve().parents[2]
TEMPLATE = REPOSITORY / "template.yaml"
ARTIFACTS_BUCKET = "local-sam-artifacts"
#: The query function's image when the caller names none: the emulator never runs an image, and an
#: empty QueryImageUri would ask for a CodeBuild build of it.
LOCAL_QUERY_IMAGE = "local/clip-query:dev"
# The properties `sam package` uploads: local folders that become S3 locations.
_PACKAGED = {
    "AWS::Serverless::Function": "CodeUri",
    "AWS::Serverless::LayerVersion": "ContentUri",
    "AWS::Lambda::LayerVersion": "Content",
}


class _NoManagedPolicies:
    """The translator asks IAM for AWS managed policy ARNs; offline, the template names none by name."""

    def load(self) -> dict[str, str]:
        return {}


@contextmanager
def running() -> Iterator[Clients]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # Batch jobs are run by the local runner (see local.py), not by moto in Docker.
    requests.post(
        f"{endpoint}/moto-api/config", json={"batch": {"use_docker": False}, "lambda": {"use_docker": False}}, timeout=10
    )
    try:
        yield Clients(endpoint_url=endpoint, region=REGION)
    finally:
        server.stop()


def _zip_folder(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                archive.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()


def _package(template: dict[str, Any], clients: Clients) -> None:
    """What `sam package` does: upload each local code folder and point the template at it."""
    s3 = clients.client("s3")
    s3.create_bucket(Bucket=ARTIFACTS_BUCKET)
    for logical_id, resource in template["Resources"].items():
        prop = _PACKAGED.get(resource["Type"])
        location = resource.get("Properties", {}).get(prop)
        if not isinstance(location, str) or location.startswith("s3://"):
            continue
        s3.put_object(Bucket=ARTIFACTS_BUCKET, Key=logical_id, Body=_zip_folder(REPOSITORY / location))
        if resource["Type"].startswith("AWS::Serverless::"):
            resource["Properties"][prop] = f"s3://{ARTIFACTS_BUCKET}/{logical_id}"
        else:
            resource["Properties"][prop] = {"S3Bucket": ARTIFACTS_BUCKET, "S3Key": logical_id}


def _fill_moto_gaps(template: dict[str, Any], clients: Clients, stack_name: str) -> None:
    service_role: str | None = None
    for logical_id, resource in template["Resources"].items():
        properties = resource.setdefault("Properties", {})
        if resource["Type"] == "AWS::Batch::ComputeEnvironment" and "ServiceRole" not in properties:
            # Gap: moto requires ServiceRole, which AWS makes optional (the service-linked role): one
            # for every compute environment of the stack, as the service-linked role is.
            if service_role is None:
                iam = clients.client("iam")
                role = iam.create_role(RoleName=f"{stack_name}-batch-service", AssumeRolePolicyDocument="{}")
                service_role = str(role["Role"]["Arn"])
            properties["ServiceRole"] = service_role
        if resource["Type"] == "AWS::ECR::Repository" and "RepositoryName" not in properties:
            # Gap: moto generates repository names with capitals, then rejects them itself.
            properties["RepositoryName"] = f"{stack_name}-{logical_id}".lower()


def _parameters(template: dict[str, Any], overrides: dict[str, str]) -> list[dict[str, str]]:
    values = {
        # Gap: moto leaves a CommaDelimitedList default as one string (it splits only given values).
        name: spec["Default"]
        for name, spec in template.get("Parameters", {}).items()
        if spec.get("Type") == "CommaDelimitedList" and "Default" in spec
    }
    values.update(overrides)
    return [{"ParameterKey": key, "ParameterValue": str(value)} for key, value in values.items()]


def _apply_bucket_notifications(template: dict[str, Any], stack_name: str, clients: Clients) -> None:
    """Gap: moto's CloudFormation creates buckets without their NotificationConfiguration."""
    resources = cloudformation_backends[ACCOUNT][REGION].get_stack(stack_name).resource_map
    s3 = clients.client("s3")
    for logical_id, resource in template["Resources"].items():
        if resource["Type"] != "AWS::S3::Bucket" or "NotificationConfiguration" not in resource["Properties"]:
            continue
        # moto's own resolver evaluates the Refs, GetAtts and conditions against the created stack.
        declared = clean_json(resource["Properties"]["NotificationConfiguration"], resources)
        queues = [
            {
                "QueueArn": item["Queue"],
                "Events": [item["Event"]],
                **({"Filter": {"Key": {"FilterRules": item["Filter"]["S3Key"]["Rules"]}}} if item.get("Filter") else {}),
            }
            for item in declared.get("QueueConfigurations", [])
        ]
        bucket = resources[logical_id]
        assert bucket is not None, f"the stack has no {logical_id}"
        s3.put_bucket_notification_configuration(
            Bucket=bucket.physical_resource_id,
            NotificationConfiguration={"QueueConfigurations": queues},
        )


def deploy(clients: Clients, stack_name: str, parameters: dict[str, str], template_path: Path = TEMPLATE) -> None:
    """Create the stack in the emulator as `sam build && sam deploy` would in AWS."""
    template = yaml_parse(template_path.read_text())
    _package(template, clients)
    translated = transform(template, {}, _NoManagedPolicies())
    _fill_moto_gaps(translated, clients, stack_name)
    ec2 = clients.client("ec2")
    default_vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    subnets = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [default_vpc]}])["Subnets"]
    network = {"VpcId": default_vpc, "SubnetIds": ",".join(subnet["SubnetId"] for subnet in subnets[:2])}
    cloudformation = clients.client("cloudformation")
    cloudformation.create_stack(
        StackName=stack_name,
        TemplateBody=json.dumps(translated),
        Parameters=_parameters(translated, {**network, "QueryImageUri": LOCAL_QUERY_IMAGE, **parameters}),
        Capabilities=["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM", "CAPABILITY_AUTO_EXPAND"],
    )
    status = cloudformation.describe_stacks(StackName=stack_name)["Stacks"][0]
    if status["StackStatus"] != "CREATE_COMPLETE":
        raise RuntimeError(f"the emulated stack {stack_name} is {status['StackStatus']}: {status.get('StackStatusReason')}")
    _apply_bucket_notifications(translated, stack_name, clients)
