"""Capacity: the account's G-instance vCPU quota and the instance types in the subnets' zones, for the
GPU workers; the On-Demand Standard vCPU quota, IndexInstanceTypes' sizes and their zones, for the index job.

The index job runs only once a store passes IndexMaxTrainRows, and until then nothing needs its
instances: what it lacks is a warning. Only an IndexInstanceTypes name that is no instance type
fails, since Batch refuses the compute environment and with it the deploy.
"""

from __future__ import annotations

import re
from typing import Any

from clip_pipeline.preflight.findings import Check, ClientFactory, QuotaRequest, Status, default_only, quota
from clip_pipeline.preflight.parameters import DeployParameters
from clip_shared.network import subnet_zones, type_pattern

ON_DEMAND_GPU_VCPUS = ("ec2", "L-DB2E81BA")
SPOT_GPU_VCPUS = ("ec2", "L-3819A6DF")
#: "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances", which the index job's instances count against.
ON_DEMAND_STANDARD_VCPUS = ("ec2", "L-1216C47A")
#: Instance types of those families (i3, im4gn, is4gen, but not inf1 or hpc7a, which have quotas of their own).
_STANDARD_TYPE = re.compile(r"(?:[acdhmrtz]|i[ms]?)\d", re.IGNORECASE)
#: What ECS keeps back of an instance's memory from its jobs: the kernel's share (AWS Batch advises a 5%
#: margin for it) and 32 MiB for its agent.
ECS_MEMORY_MARGIN, ECS_AGENT_MIB = 0.05, 32
#: Instance types Batch chooses itself; "optimal" and "default_x86_64" include sizes that hold any job.
_BATCH_CHOICES = {"optimal": True, "default_x86_64": True, "default_arm64": False}
#: What an index job that cannot start means for a deployed stack.
_INDEX_JOB_WAITS = (
    "a vector-index training past IndexMaxTrainRows waits in RUNNABLE until RunnableTimeoutSeconds cancels it "
    "(StuckJobsAlarm fires), and searches keep working with the older index"
)


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


def check_index_vcpus(client: ClientFactory, parameters: DeployParameters) -> Check:
    """Whether the On-Demand Standard instances vCPU quota holds one index job (IndexJobDefinition)."""
    service_code, quota_code = ON_DEMAND_STANDARD_VCPUS
    found = quota(client("service-quotas"), service_code, quota_code)
    job_vcpus = parameters.index_job_vcpus
    request = QuotaRequest(service_code, quota_code, found.name, job_vcpus)
    other = [name for name in parameters.items("IndexInstanceTypes") if not _STANDARD_TYPE.match(name)]
    unchecked = f" (IndexInstanceTypes also names {', '.join(other)}, whose quotas this does not check)" if other else ""
    if found.value < job_vcpus:
        return Check(
            "index-vcpus",
            Status.WARN,
            f"{found.described()} vCPUs, fewer than the index job's {job_vcpus}: {_INDEX_JOB_WAITS}. Request "
            f"{job_vcpus} or more (shared with the account's other standard instances){unchecked}",
            request,
        )
    if not found.applied:
        return default_only("index-vcpus", found, request, f"check the quota in the Service Quotas console{unchecked}")
    return Check(
        "index-vcpus",
        Status.WARN if other else Status.PASS,
        f"{found.name}: {found.value} vCPUs, enough for the index job's {job_vcpus} if the account's other standard "
        f"instances leave it that many{unchecked}",
    )


def check_index_instance_zones(ec2: Any, parameters: DeployParameters, subnets: list[dict[str, Any]], default_vpc: bool) -> Check:
    """Whether the zones of the subnets Batch is given offer IndexInstanceTypes: the index job's compute
    environment has the GPU environment's subnets."""
    if default_vpc:
        # The default subnets the deploy helper hands to Batch: those in zones that offer InstanceTypes.
        handed, _ = subnet_zones(ec2, parameters.items("InstanceTypes"), subnets)
        subnets = [subnet for subnet in subnets if subnet["SubnetId"] in handed]
    if not subnets:
        return Check("index-instance-zones", Status.UNKNOWN, "not checked: no subnet of the GPU workers to check")
    types = parameters.items("IndexInstanceTypes")
    kept, without = subnet_zones(ec2, types, subnets)
    named = ", ".join(types)
    if not kept:
        return Check(
            "index-instance-zones",
            Status.WARN,
            f"no zone of the GPU workers' subnets ({', '.join(without)}) offers {named}: {_INDEX_JOB_WAITS}. "
            "Deploy with IndexInstanceTypes this region offers there",
        )
    if without:
        return Check(
            "index-instance-zones",
            Status.PASS,
            f"{named} offered in the zones of {len(kept)} of the GPU workers' {len(subnets)} subnets; "
            f"not in {', '.join(without)}, where no index job starts",
        )
    return Check(
        "index-instance-zones", Status.PASS, f"{named} offered in the zones of all {len(kept)} of the GPU workers' subnets"
    )


def _holds(described: dict[str, Any], vcpus: int, memory: int) -> bool:
    """Whether an instance (DescribeInstanceTypes) can run a job of `vcpus` and `memory` MiB of the x86_64 worker image."""
    registered = described["MemoryInfo"]["SizeInMiB"] * (1 - ECS_MEMORY_MARGIN) - ECS_AGENT_MIB
    x86 = "x86_64" in described["ProcessorInfo"]["SupportedArchitectures"]
    return x86 and described["VCpuInfo"]["DefaultVCpus"] >= vcpus and registered >= memory


def check_index_instance_types(ec2: Any, parameters: DeployParameters) -> Check:
    """Whether IndexInstanceTypes are instance types, and one of them holds the index job (IndexJobDefinition)."""
    names = parameters.items("IndexInstanceTypes")
    vcpus, memory = parameters.index_job_vcpus, parameters.index_job_memory
    described, unknown = [], []
    for name in (name for name in names if name not in _BATCH_CHOICES):
        # A filter, not InstanceTypes=[...]: it takes a family's wildcard, and answers a name it does not know with nothing.
        filters = [{"Name": "instance-type", "Values": [type_pattern(name)]}]
        pages = ec2.get_paginator("describe_instance_types").paginate(Filters=filters)
        found = [item for page in pages for item in page["InstanceTypes"]]
        described += found
        unknown += [] if found else [name]
    if unknown:
        return Check(
            "index-instance-types",
            Status.FAIL,
            f"IndexInstanceTypes names {', '.join(unknown)}, no instance type of this region: Batch refuses a compute "
            'environment naming it ("Instance type can only be one of ..."), and the deploy fails',
        )
    holding = sorted(item["InstanceType"] for item in described if _holds(item, vcpus, memory))
    holding += [name for name in names if _BATCH_CHOICES.get(name)]
    job = f"the index job's {vcpus} vCPUs and {memory:,} MiB (with ECS's reservation) on x86_64"
    if not holding:
        return Check(
            "index-instance-types",
            Status.WARN,
            f"no type of {', '.join(names)} holds {job}: {_INDEX_JOB_WAITS}. Deploy with IndexInstanceTypes of 16 "
            "vCPUs and 32 GiB or more (the default's)",
        )
    shown = ", ".join(holding[:4]) + (f" and {len(holding) - 4} more" if len(holding) > 4 else "")
    return Check("index-instance-types", Status.PASS, f"{shown} hold {job}")
