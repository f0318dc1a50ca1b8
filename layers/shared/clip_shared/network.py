"""Where the GPU instances run when the deployer names no VpcId/SubnetIds: the region's default VPC.

The deploy helper resolves it during `sam deploy` (the DefaultNetwork custom resource), and
`clip-pipeline preflight` checks beforehand that it can be resolved. Only subnets in zones that offer
the compute environment's instance types are handed to Batch: a default subnet in a zone without
them would leave Batch trying to launch there.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
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
    #: Zones of default subnets left out because they offer none of the instance types.
    zones_without_instances: tuple[str, ...] = ()


def type_pattern(name: str) -> str:
    """The instance types a name of Batch's InstanceTypes stands for, as a wildcard: a type, or a family's every size."""
    return name if "." in name else f"{name}.*"


def offering_zones(ec2: Any, instance_types: Sequence[str]) -> set[str]:
    """The region's zones that offer any of `instance_types` (types such as g4dn.xlarge, or families such as g4dn)."""
    # Every offering of the region (a few pages), matched here: a family is a pattern, and EC2's
    # filter wildcards are not what every implementation of the API understands.
    pages = ec2.get_paginator("describe_instance_type_offerings").paginate(LocationType="availability-zone")
    return {
        offering["Location"]
        for page in pages
        for offering in page["InstanceTypeOfferings"]
        if any(fnmatch.fnmatchcase(offering["InstanceType"], type_pattern(name)) for name in instance_types)
    }


def subnet_zones(ec2: Any, instance_types: Sequence[str], subnets: Sequence[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The subnets (described) split into the ids of those whose zone offers `instance_types` and the zones of the rest."""
    offered = offering_zones(ec2, instance_types)
    kept = sorted(subnet["SubnetId"] for subnet in subnets if subnet["AvailabilityZone"] in offered)
    without = sorted({subnet["AvailabilityZone"] for subnet in subnets if subnet["AvailabilityZone"] not in offered})
    return kept, without


def default_network(ec2: Any, instance_types: Sequence[str] = ()) -> Network:
    """The default VPC and its default subnets (one per availability zone); with `instance_types`,
    only the subnets in zones that offer at least one of them."""
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
    if not instance_types:
        return Network(vpc_id, tuple(sorted(subnet["SubnetId"] for subnet in subnets)))
    kept, without = subnet_zones(ec2, instance_types, subnets)
    if not kept:
        raise NetworkError(
            "no-zone-offers-instance-types",
            f"no zone of the default VPC {vpc_id}'s subnets ({', '.join(without)}) offers {', '.join(instance_types)}: "
            "deploy with InstanceTypes that this region offers, or in another region",
        )
    return Network(vpc_id, tuple(kept), tuple(without))
