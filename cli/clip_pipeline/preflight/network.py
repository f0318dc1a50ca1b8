"""Where the GPU instances (and the index job's CPU instances) run: the default VPC's default subnets,
or the given VpcId and SubnetIds, in zones that offer the instance types."""

from __future__ import annotations

from typing import Any

from botocore.exceptions import ClientError

from clip_pipeline.preflight.capacity import check_index_instance_zones, check_instance_zones
from clip_pipeline.preflight.findings import Check, ClientFactory, Status
from clip_pipeline.preflight.parameters import DeployParameters
from clip_shared.network import NetworkError, default_network

CODES = ["network", "instance-zones", "index-instance-zones"]


def _unchecked(reason: str) -> list[Check]:
    return [Check(code, Status.UNKNOWN, f"not checked: {reason}") for code in CODES[1:]]


def _zones(ec2: Any, parameters: DeployParameters, subnets: list[dict[str, Any]], default_vpc: bool) -> list[Check]:
    return [
        check_instance_zones(ec2, parameters, subnets, default_vpc),
        check_index_instance_zones(ec2, parameters, subnets, default_vpc),
    ]


def check_network(client: ClientFactory, parameters: DeployParameters) -> list[Check]:
    ec2 = client("ec2")
    vpc, subnet_ids = parameters.values["VpcId"], parameters.items("SubnetIds")
    if bool(vpc) != bool(subnet_ids):
        return [
            Check("network", Status.FAIL, "VpcId and SubnetIds go together: the template refuses one without the other"),
            *_unchecked("no network"),
        ]
    if not vpc:
        try:
            network = default_network(ec2)
        except NetworkError as exc:
            return [Check("network", Status.FAIL, f"{exc.code}: {exc}"), *_unchecked("no default subnets")]
        subnets = ec2.describe_subnets(SubnetIds=list(network.subnet_ids))["Subnets"]
        found = Check("network", Status.PASS, f"default VPC {network.vpc_id} with {len(network.subnet_ids)} default subnets")
        return [found, *_zones(ec2, parameters, subnets, default_vpc=True)]
    try:
        subnets = ec2.describe_subnets(SubnetIds=subnet_ids)["Subnets"]
    except ClientError as exc:
        if not exc.response["Error"]["Code"].startswith("InvalidSubnetID"):
            raise
        return [Check("network", Status.FAIL, f"SubnetIds: {exc.response['Error']['Message']}"), *_unchecked("no subnets")]
    elsewhere = sorted(subnet["SubnetId"] for subnet in subnets if subnet["VpcId"] != vpc)
    if elsewhere:
        return [
            Check("network", Status.FAIL, f"SubnetIds {', '.join(elsewhere)} are not in VpcId {vpc}"),
            *_zones(ec2, parameters, subnets, default_vpc=False),
        ]
    found = Check(
        "network",
        Status.PASS,
        f"{len(subnets)} subnets of {vpc}; the instances reach ECR and S3 from them only through public IPs, a NAT gateway or VPC endpoints",
    )
    return [found, *_zones(ec2, parameters, subnets, default_vpc=False)]
