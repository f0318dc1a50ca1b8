"""Where the GPU instances run when the deployer names no VpcId/SubnetIds: the region's default VPC.

The deploy helper resolves it during `sam deploy` (the DefaultNetwork custom resource), and
`clip-pipeline preflight` checks beforehand that it can be resolved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class NetworkError(Exception):
    """The default network cannot be used. `code` is stable; the message says what to do instead."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Network:
    vpc_id: str
    subnet_ids: tuple[str, ...]


def default_network(ec2: Any) -> Network:
    """The default VPC and its default subnets (one per availability zone)."""
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
    if not vpcs:
        raise NetworkError(
            "no-default-vpc",
            "this region has no default VPC: deploy with VpcId and SubnetIds, or create one with `aws ec2 create-default-vpc`",
        )
    vpc_id = vpcs[0]["VpcId"]
    subnets = ec2.describe_subnets(
        Filters=[{"Name": "vpc-id", "Values": [vpc_id]}, {"Name": "default-for-az", "Values": ["true"]}]
    )["Subnets"]
    if not subnets:
        raise NetworkError(
            "no-default-subnets",
            f"the default VPC {vpc_id} has no default subnets: deploy with VpcId and SubnetIds, or create them "
            "with `aws ec2 create-default-subnet --availability-zone <zone>`",
        )
    return Network(vpc_id, tuple(sorted(subnet["SubnetId"] for subnet in subnets)))
