"""GPU capacity: the account's G-instance vCPU quota, and the instance types in the subnets' zones."""

from __future__ import annotations

from typing import Any

from clip_pipeline.preflight.findings import Check, ClientFactory, QuotaRequest, Status, default_only, quota
from clip_pipeline.preflight.parameters import DeployParameters
from clip_shared.network import subnet_zones

ON_DEMAND_GPU_VCPUS = ("ec2", "L-DB2E81BA")
SPOT_GPU_VCPUS = ("ec2", "L-3819A6DF")


def check_gpu_vcpus(client: ClientFactory, parameters: DeployParameters) -> Check:
    spot = parameters.values["UseSpot"] == "true"
    service_code, quota_code = SPOT_GPU_VCPUS if spot else ON_DEMAND_GPU_VCPUS
    found = quota(client("service-quotas"), service_code, quota_code)
    name, value = found.name, found.value
    max_vcpus, job_vcpus = parameters.number("MaxvCpus"), parameters.job_vcpus
    request = QuotaRequest(service_code, quota_code, name, max_vcpus)
    other = [family for family in parameters.items("InstanceTypes") if not family.lower().startswith("g")]
    unchecked = f" (InstanceTypes also names {', '.join(other)}, whose quotas this does not check)" if other else ""
    if value < job_vcpus:
        return Check(
            "gpu-vcpus",
            Status.FAIL,
            f"{found.described()} vCPUs, fewer than one job's {job_vcpus}: no instance can start and every job waits in RUNNABLE{unchecked}",
            request,
        )
    if not found.applied:
        return default_only("gpu-vcpus", found, request, f"check the quota in the Service Quotas console{unchecked}")
    if value < max_vcpus:
        return Check(
            "gpu-vcpus",
            Status.WARN,
            f"{name}: {value} vCPUs, below MaxvCpus={max_vcpus}: at most {value // job_vcpus} jobs run at once{unchecked}",
            request,
        )
    return Check(
        "gpu-vcpus", Status.WARN if other else Status.PASS, f"{name}: {value} vCPUs, enough for MaxvCpus={max_vcpus}{unchecked}"
    )


def check_instance_zones(ec2: Any, parameters: DeployParameters, subnets: list[dict[str, Any]], default_vpc: bool) -> Check:
    """Whether the subnets' zones offer InstanceTypes: Batch launches only where both meet."""
    types = parameters.items("InstanceTypes")
    kept, without = subnet_zones(ec2, types, subnets)
    named = ", ".join(types)
    if not kept:
        return Check(
            "instance-zones",
            Status.FAIL,
            f"no zone of the {'default ' if default_vpc else ''}subnets ({', '.join(without)}) offers {named}: no GPU instance "
            "can start. Deploy with InstanceTypes this region offers there"
            + ("" if default_vpc else ", or SubnetIds in zones that offer them"),
        )
    if not without:
        return Check("instance-zones", Status.PASS, f"{named} offered in the zones of all {len(kept)} subnets")
    if default_vpc:
        return Check(
            "instance-zones",
            Status.PASS,
            f"{named} offered in the zones of {len(kept)} default subnets; those in {', '.join(without)} are left out",
        )
    return Check(
        "instance-zones",
        Status.WARN,
        f"{named} is not offered in {', '.join(without)}: Batch cannot launch in the SubnetIds there; leave them out",
    )
