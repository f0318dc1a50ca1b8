"""`clip-pipeline preflight`: what a first `sam deploy` of template.yaml needs of an account, checked with
the deployer's credentials before anything is created.

New accounts start with small quotas, and each of these once failed a first deploy late (after the
image builds) or left a deployed stack unable to work. Every check answers pass, warn or fail
(unknown when the credentials may not read what it needs, or when Service Quotas knows only AWS's
default for a quota, which new accounts are often not given), and a short quota comes with the exact
increase to request. One module per thing checked:

- functions: the Lambda functions' concurrency (dispatcher, indexer, query function, and the query
  API's burst) and the query function's memory.
- capacity: the G-instance vCPU quota, and the instance types in the subnets' zones; the same for the
  index job's CPU instances (the On-Demand Standard vCPU quota, IndexInstanceTypes' sizes and zones),
  as warnings: nothing needs them until a store passes IndexMaxTrainRows.
- builds: CodeBuild in the region, and its concurrent-build quota for the image builds.
- network: the default VPC and its default subnets, or the given VpcId and SubnetIds.
- logs: the region's 10 CloudWatch Logs resource policies.
- naming: the stack name, which names the buckets.
- toolchain: the Python 3.12 `sam build` needs.

The deploy's parameters are the template's defaults, then samconfig.toml's parameter_overrides,
then the ones given here, as `sam deploy` resolves them (parameters).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from clip_pipeline.preflight import functions, network
from clip_pipeline.preflight.builds import check_codebuild, check_codebuild_region
from clip_pipeline.preflight.capacity import check_gpu_vcpus, check_index_instance_types, check_index_vcpus
from clip_pipeline.preflight.findings import Check, ClientFactory, PreflightError, Report, Status
from clip_pipeline.preflight.logs import check_logs_resource_policies
from clip_pipeline.preflight.naming import check_stack_name
from clip_pipeline.preflight.parameters import DeployParameters, deploy_parameters
from clip_pipeline.preflight.toolchain import check_sam_build_python

__all__ = ["Check", "DeployParameters", "PreflightError", "Report", "Status", "deploy_parameters", "render", "run"]


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
        check_stack_name(parameters.stack_name, account, region),
        *_checked(functions.CODES, lambda: functions.check_lambda(client, parameters)),
        *_checked(["gpu-vcpus"], lambda: check_gpu_vcpus(client, parameters)),
        *_checked(["index-vcpus"], lambda: check_index_vcpus(client, parameters)),
        *_checked(["index-instance-types"], lambda: check_index_instance_types(client("ec2"), parameters)),
        check_codebuild_region(parameters, region),
        *_checked(["codebuild-builds"], lambda: check_codebuild(client, parameters)),
        *_checked(network.CODES, lambda: network.check_network(client, parameters)),
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
