"""`clip-pipeline preflight`: what a first `sam deploy` of template.yaml needs of an account, checked with
the deployer's credentials before anything is created.

New accounts start with small quotas, and each of these once failed a first deploy late (after the
15-25 minute image builds) or left a deployed stack unable to work. Every check answers pass, warn
or fail (unknown when the credentials may not read what it needs), and a short quota comes with
the exact increase to request:

- lambda-concurrency: the dispatcher runs up to DispatcherConcurrency invocations on the account's
  unreserved concurrency (nothing is reserved: Lambda keeps 100 unreserved, so a reservation fails
  on a new account's 10), and the query function needs one more.
- lambda-memory: a new account may be refused functions above 3008 MB; no API reports that cap, so
  the account's concurrency quota, which starts below 1,000 on new accounts, is the tell.
- gpu-vcpus: Running On-Demand (or, with UseSpot, Spot) G and VT instances, in vCPUs: at least one
  job's worth, and MaxvCpus for the compute environment to scale as configured.
- codebuild-builds: concurrent Linux/Large builds, for the worker and query image builds.
- network: the default VPC and its default subnets, or the given VpcId and SubnetIds.
- logs-resource-policies: CloudWatch Logs allows 10 resource policies per region, and the stack
  adds one for its failed-jobs log group.
- sam-build-python: `sam build` needs a Python 3.12 on PATH for the python3.12 functions and layer.

The deploy's parameters are the template's defaults, then samconfig.toml's parameter_overrides
(what `sam deploy --guided` saved), then the ones given here, as `sam deploy` resolves them.
"""

from __future__ import annotations

import functools
import os
import shlex
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError
from rich.console import Console
from rich.table import Table
from rich.text import Text
from samtranslator.yaml_helper import yaml_parse

from clip_pipeline.emulator import TEMPLATE
from clip_pipeline.stack import SAMCONFIG, samconfig_setting
from clip_shared.network import NetworkError, default_network

#: Functions above this much memory are refused on new accounts until AWS raises their limits.
NEW_ACCOUNT_MEMORY_MB = 3008
#: New accounts start below Lambda's default of 1,000 concurrent executions.
STANDARD_CONCURRENCY = 1000
#: CloudWatch Logs resource policies per region; AWS does not raise it.
LOGS_RESOURCE_POLICIES = 10
LAMBDA_CONCURRENCY = ("lambda", "L-B99A9384")
ON_DEMAND_GPU_VCPUS = ("ec2", "L-DB2E81BA")
SPOT_GPU_VCPUS = ("ec2", "L-3819A6DF")
#: The quota of ImageBuild's compute type, BUILD_GENERAL1_LARGE on Linux.
LINUX_LARGE_BUILDS = ("codebuild", "L-4DDC4A99")
#: The executables `sam build` tries for a python3.12 runtime, in its order.
SAM_PYTHONS = ("python3.12", "python", "python3")

ClientFactory = Callable[[str], Any]


class PreflightError(Exception):
    """The checks cannot run at all. `code` is stable; the message says what to do."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Status(StrEnum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class QuotaRequest:
    service_code: str
    quota_code: str
    quota_name: str
    desired_value: int

    def command(self, region: str) -> str:
        return (
            f"aws service-quotas request-service-quota-increase --service-code {self.service_code} "
            f"--quota-code {self.quota_code} --desired-value {self.desired_value} --region {region}"
        )


@dataclass(frozen=True)
class Check:
    code: str
    status: Status
    finding: str
    request: QuotaRequest | None = None


@dataclass(frozen=True)
class Report:
    stack_name: str
    account: str
    region: str
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(check.status is not Status.FAIL for check in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "stack_name": self.stack_name,
            "account": self.account,
            "region": self.region,
            "ok": self.ok,
            "checks": [
                {
                    "code": check.code,
                    "status": str(check.status),
                    "finding": check.finding,
                    "request": None
                    if check.request is None
                    else {
                        "service_code": check.request.service_code,
                        "quota_code": check.request.quota_code,
                        "quota_name": check.request.quota_name,
                        "desired_value": check.request.desired_value,
                        "command": check.request.command(self.region),
                    },
                }
                for check in self.checks
            ],
        }


@functools.cache
def _template(path: Path) -> dict[str, Any]:
    return yaml_parse(path.read_text())


@dataclass(frozen=True)
class DeployParameters:
    """The parameter values a `sam deploy` of `template` would use, and what they imply."""

    stack_name: str
    values: dict[str, str]
    template: Path = TEMPLATE

    def number(self, name: str) -> int:
        try:
            return int(self.values[name])
        except ValueError:
            raise PreflightError("bad-parameter", f"{name}={self.values[name]!r} is not a number") from None

    def items(self, name: str) -> list[str]:
        return [item.strip() for item in self.values[name].split(",") if item.strip()]

    @property
    def query_service(self) -> bool:
        return self.values["QueryService"] == "true"

    @property
    def image_builds(self) -> list[str]:
        """The images the deploy builds in CodeBuild: those not given by URI."""
        builds = [("worker", not self.values["ImageUri"]), ("query", self.query_service and not self.values["QueryImageUri"])]
        return [name for name, built in builds if built]

    @property
    def job_vcpus(self) -> int:
        """The vCPUs one worker job asks for (WorkerJobDefinition), the least a GPU quota must allow."""
        container = _template(self.template)["Resources"]["WorkerJobDefinition"]["Properties"]["ContainerProperties"]
        return next(int(item["Value"]) for item in container["ResourceRequirements"] if item["Type"] == "VCPU")

    @property
    def logs_resource_policies(self) -> list[str]:
        """The names of the CloudWatch Logs resource policies the stack creates."""
        resources = _template(self.template)["Resources"].values()
        names = [
            resource["Properties"]["PolicyName"] for resource in resources if resource["Type"] == "AWS::Logs::ResourcePolicy"
        ]
        return [
            name["Fn::Sub"].replace("${AWS::StackName}", self.stack_name) if isinstance(name, dict) else name for name in names
        ]


def _pairs(overrides: str | Iterable[str] | None) -> Iterable[str]:
    """KEY=VALUE pairs, from a string as `sam deploy --parameter-overrides` takes it, or a list of them."""
    if overrides is None:
        return []
    return [pair for item in ([overrides] if isinstance(overrides, str) else overrides) for pair in shlex.split(item)]


def deploy_parameters(
    stack_name: str, overrides: Sequence[str] = (), template: Path = TEMPLATE, samconfig: Path = SAMCONFIG
) -> DeployParameters:
    declared = _template(template)["Parameters"]
    values = {name: str(spec.get("Default", "")) for name, spec in declared.items()}
    for pair in [*_pairs(samconfig_setting("parameter_overrides", samconfig)), *_pairs(overrides)]:
        name, equals, value = pair.partition("=")
        if not equals or name not in declared:
            raise PreflightError("unknown-parameter", f"{pair!r} is not NAME=VALUE for a parameter of {template.name}")
        values[name] = value
    return DeployParameters(stack_name, values, template)


def _quota(quotas: Any, service_code: str, quota_code: str) -> tuple[str, int]:
    """A quota's name and the value applied to this account (AWS's default where none was ever applied)."""
    try:
        quota = quotas.get_service_quota(ServiceCode=service_code, QuotaCode=quota_code)["Quota"]
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "NoSuchResourceException":
            raise
        quota = quotas.get_aws_default_service_quota(ServiceCode=service_code, QuotaCode=quota_code)["Quota"]
    return quota["QuotaName"], int(quota["Value"])


def check_lambda(client: ClientFactory, parameters: DeployParameters) -> list[Check]:
    limits = client("lambda").get_account_settings()["AccountLimit"]
    limit, unreserved = int(limits["ConcurrentExecutions"]), int(limits["UnreservedConcurrentExecutions"])
    dispatcher = parameters.number("DispatcherConcurrency")
    needed = dispatcher + (1 if parameters.query_service else 0)
    if unreserved >= needed:
        concurrency = Check(
            "lambda-concurrency",
            Status.PASS,
            f"{unreserved} unreserved concurrent executions; the stack's functions need {needed}",
        )
    else:
        fits = unreserved - (needed - dispatcher)
        concurrency = Check(
            "lambda-concurrency",
            Status.FAIL,
            f"{unreserved} unreserved concurrent executions, fewer than the {needed} the stack needs "
            f"(DispatcherConcurrency={dispatcher}{' and the query function' if parameters.query_service else ''}): "
            "throttled dispatches are retried and can end in the dead-letter queue. Request more"
            + (f", or deploy with DispatcherConcurrency={fits}" if fits >= 2 else ""),
            QuotaRequest(*LAMBDA_CONCURRENCY, "Concurrent executions", limit + needed - unreserved),
        )
    memory = parameters.number("QueryMemorySize")
    if not parameters.query_service or memory <= NEW_ACCOUNT_MEMORY_MB:
        memory_check = Check(
            "lambda-memory",
            Status.PASS,
            f"QueryMemorySize={memory} MB is within every account's limit"
            if parameters.query_service
            else "no query function (QueryService=false)",
        )
    elif limit < STANDARD_CONCURRENCY:
        memory_check = Check(
            "lambda-memory",
            Status.WARN,
            f"QueryMemorySize={memory} MB, and this account has a new account's Lambda quotas ({limit} concurrent executions): "
            f"such accounts are often refused functions above {NEW_ACCOUNT_MEMORY_MB} MB, which fails the deploy. "
            f"Deploy with QueryMemorySize={NEW_ACCOUNT_MEMORY_MB}, or ask AWS Support to lift the cap (it has no quota code)",
        )
    else:
        memory_check = Check(
            "lambda-memory", Status.PASS, f"QueryMemorySize={memory} MB; this account has Lambda's standard quotas"
        )
    return [concurrency, memory_check]


def check_gpu_vcpus(client: ClientFactory, parameters: DeployParameters) -> Check:
    spot = parameters.values["UseSpot"] == "true"
    service_code, quota_code = SPOT_GPU_VCPUS if spot else ON_DEMAND_GPU_VCPUS
    name, value = _quota(client("service-quotas"), service_code, quota_code)
    max_vcpus, job_vcpus = parameters.number("MaxvCpus"), parameters.job_vcpus
    request = QuotaRequest(service_code, quota_code, name, max_vcpus)
    other = [family for family in parameters.items("InstanceTypes") if not family.lower().startswith("g")]
    unchecked = f" (InstanceTypes also names {', '.join(other)}, whose quotas this does not check)" if other else ""
    if value < job_vcpus:
        return Check(
            "gpu-vcpus",
            Status.FAIL,
            f"{name}: {value} vCPUs, fewer than one job's {job_vcpus}: no instance can start and every job waits in RUNNABLE{unchecked}",
            request,
        )
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


def check_codebuild(client: ClientFactory, parameters: DeployParameters) -> Check:
    builds = parameters.image_builds
    if not builds:
        return Check(
            "codebuild-builds", Status.PASS, "no image is built during the deploy (ImageUri and QueryImageUri are given)"
        )
    name, value = _quota(client("service-quotas"), *LINUX_LARGE_BUILDS)
    request = QuotaRequest(*LINUX_LARGE_BUILDS, name, len(builds))
    images = " and ".join(builds)
    if value < 1:
        return Check(
            "codebuild-builds",
            Status.FAIL,
            f"{name}: 0: the {images} image builds cannot start, and the deploy rolls back after an hour's wait",
            request,
        )
    if value < len(builds):
        return Check(
            "codebuild-builds",
            Status.WARN,
            f"{name}: {value}: the {images} image builds run one after the other, so the first deploy takes up to twice as long",
            request,
        )
    return Check("codebuild-builds", Status.PASS, f"{name}: {value}, enough for the {images} image builds side by side")


def check_network(client: ClientFactory, parameters: DeployParameters) -> Check:
    ec2 = client("ec2")
    vpc, subnets = parameters.values["VpcId"], parameters.items("SubnetIds")
    if bool(vpc) != bool(subnets):
        return Check("network", Status.FAIL, "VpcId and SubnetIds go together: the template refuses one without the other")
    if not vpc:
        try:
            network = default_network(ec2)
        except NetworkError as exc:
            return Check("network", Status.FAIL, f"{exc.code}: {exc}")
        return Check("network", Status.PASS, f"default VPC {network.vpc_id} with {len(network.subnet_ids)} default subnets")
    try:
        described = ec2.describe_subnets(SubnetIds=subnets)["Subnets"]
    except ClientError as exc:
        if not exc.response["Error"]["Code"].startswith("InvalidSubnetID"):
            raise
        return Check("network", Status.FAIL, f"SubnetIds: {exc.response['Error']['Message']}")
    elsewhere = sorted(subnet["SubnetId"] for subnet in described if subnet["VpcId"] != vpc)
    if elsewhere:
        return Check("network", Status.FAIL, f"SubnetIds {', '.join(elsewhere)} are not in VpcId {vpc}")
    return Check(
        "network",
        Status.PASS,
        f"{len(described)} subnets of {vpc}; the instances reach ECR and S3 from them only through public IPs, a NAT gateway or VPC endpoints",
    )


def check_logs_resource_policies(client: ClientFactory, parameters: DeployParameters) -> Check:
    existing = sorted(policy["policyName"] for policy in client("logs").describe_resource_policies()["resourcePolicies"])
    new = [name for name in parameters.logs_resource_policies if name not in existing]
    if len(existing) + len(new) <= LOGS_RESOURCE_POLICIES:
        return Check(
            "logs-resource-policies",
            Status.PASS,
            f"{len(existing)} of the region's {LOGS_RESOURCE_POLICIES} CloudWatch Logs resource policies used; the stack adds {len(new)}",
        )
    return Check(
        "logs-resource-policies",
        Status.FAIL,
        f"{len(existing)} of the region's {LOGS_RESOURCE_POLICIES} CloudWatch Logs resource policies are used (a limit AWS does not raise) "
        f"and the stack adds {len(new)}: delete one no longer needed with `aws logs delete-resource-policy --policy-name NAME`; "
        f"the region's: {', '.join(existing)}",
    )


def check_sam_build_python(search_path: str | None = None) -> Check:
    """Finds, as `sam build` does, an executable on PATH that is Python 3.12."""
    directories = (search_path if search_path is not None else os.environ.get("PATH", "")).split(os.pathsep)
    tried = []
    for name in SAM_PYTHONS:
        for directory in filter(None, directories):
            candidate = Path(directory) / name
            if not (candidate.is_file() and os.access(candidate, os.X_OK)):
                continue
            tried.append(str(candidate))
            probe = subprocess.run(
                [str(candidate), "-c", "import sys; assert sys.version_info[:2] == (3, 12)"],
                capture_output=True,
                stdin=subprocess.DEVNULL,
                timeout=60,
            )
            if probe.returncode == 0:
                return Check("sam-build-python", Status.PASS, f"`sam build` finds Python 3.12 at {candidate}")
    return Check(
        "sam-build-python",
        Status.FAIL,
        "no Python 3.12 on PATH"
        + (f" ({', '.join(tried)} are other versions)" if tried else "")
        + ': `sam build` stops with "Binary validation failed for python". Install Python 3.12; with pyenv, '
        "build with PYENV_VERSION=<a 3.12 version> as `make sam-build` does",
    )


def _checked(codes: Sequence[str], check: Callable[[], Check | list[Check]]) -> list[Check]:
    """The check's findings, or an `unknown` finding for each of its codes when AWS would not answer it."""
    try:
        result = check()
    except ClientError as exc:
        error = exc.response["Error"]
        reason = f"could not be checked: {exc.operation_name}: {error.get('Code')}: {error.get('Message', '')[:300]}"
    except BotoCoreError as exc:
        reason = f"could not be checked: {exc}"
    else:
        return result if isinstance(result, list) else [result]
    return [Check(code, Status.UNKNOWN, reason) for code in codes]


def run(client: ClientFactory, parameters: DeployParameters) -> Report:
    """Every check, against the account and region `client` reaches."""
    try:
        # STS alone answers without a region (its global endpoint); every check needs one.
        region = client("logs").meta.region_name
        sts = client("sts")
        account = sts.get_caller_identity()["Account"]
    except NoRegionError:
        raise PreflightError(
            "no-region", "no AWS region: pass --region, or set the one `sam deploy` will use (aws configure, AWS_REGION)"
        ) from None
    except NoCredentialsError:
        raise PreflightError(
            "no-credentials", "no AWS credentials: configure the ones `sam deploy` will use (aws configure, AWS_PROFILE)"
        ) from None
    checks = [
        *_checked(["lambda-concurrency", "lambda-memory"], lambda: check_lambda(client, parameters)),
        *_checked(["gpu-vcpus"], lambda: check_gpu_vcpus(client, parameters)),
        *_checked(["codebuild-builds"], lambda: check_codebuild(client, parameters)),
        *_checked(["network"], lambda: check_network(client, parameters)),
        *_checked(["logs-resource-policies"], lambda: check_logs_resource_policies(client, parameters)),
        check_sam_build_python(),
    ]
    return Report(parameters.stack_name, account, region, tuple(checks))


_STYLE = {Status.PASS: "green", Status.WARN: "yellow", Status.FAIL: "red", Status.UNKNOWN: "magenta"}


def render(report: Report, console: Console) -> None:
    table = Table(
        "", "check", "finding", title=f"preflight: stack {report.stack_name}, account {report.account}, {report.region}"
    )
    for check in report.checks:
        table.add_row(Text(str(check.status), style=_STYLE[check.status]), check.code, Text(check.finding))
    console.print(table)
    requests = [check.request for check in report.checks if check.request]
    if requests:
        console.print("Quota increases to request (Service Quotas; on a new account a request can take a day or two):")
        for request in requests:
            console.print(Text(f"  {request.quota_name}: {request.desired_value}\n    {request.command(report.region)}"))
    failed = [check.code for check in report.checks if check.status is Status.FAIL]
    console.print(
        f"[red]{len(failed)} failed ({', '.join(failed)}): fix them before `sam deploy`[/red]"
        if failed
        else "[green]ready for `sam deploy`[/green]"
    )
