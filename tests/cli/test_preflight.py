"""`clip-pipeline preflight` against an account: moto for EC2 (its default VPC, and the instance type
offerings of its zones: us-east-1e has no g4dn, as in AWS), CloudWatch Logs and STS; Lambda's account
settings and Service Quotas, which moto does not emulate, answered by a stub from a table of the
account's quotas. `sam build`'s Python is looked for on a PATH each test sets up with real files."""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from moto import mock_aws
from typer.testing import CliRunner

from clip_pipeline.app import app
from clip_pipeline.preflight import deploy_parameters
from clip_pipeline.preflight.capacity import check_index_instance_types

REGION = "us-east-1"
ON_DEMAND_GPU, SPOT_GPU, LINUX_LARGE_BUILDS, LAMBDA_CONCURRENCY = "L-DB2E81BA", "L-3819A6DF", "L-4DDC4A99", "L-B99A9384"
ON_DEMAND_STANDARD = "L-1216C47A"
QUOTA_NAMES = {
    ON_DEMAND_GPU: "Running On-Demand G and VT instances",
    ON_DEMAND_STANDARD: "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances",
    SPOT_GPU: "All G and VT Spot Instance Requests",
    LINUX_LARGE_BUILDS: "Concurrently running builds for Linux/Large environment",
}
runner = CliRunner()


@dataclass
class Account:
    """What the stubs answer: Lambda's account settings, and quota values by code. A quota in
    `applied` was set for this account; one only in `defaults` has AWS's default (GetServiceQuota
    answers NoSuchResourceException for it, as Service Quotas does)."""

    concurrency: int = 1000
    unreserved: int = 1000
    applied: dict[str, float] = field(
        default_factory=lambda: {ON_DEMAND_GPU: 64.0, SPOT_GPU: 64.0, LINUX_LARGE_BUILDS: 2.0, ON_DEMAND_STANDARD: 64.0}
    )
    defaults: dict[str, float] = field(
        default_factory=lambda: {ON_DEMAND_GPU: 0.0, SPOT_GPU: 0.0, LINUX_LARGE_BUILDS: 15.0, ON_DEMAND_STANDARD: 5.0}
    )
    denied: bool = False
    asked: list[tuple[str, str]] = field(default_factory=list)

    def answer(self, model: Any, params: dict[str, Any], **_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        """botocore's before-call hook: an answer here is the call's answer, and nothing is sent."""
        if self.denied:
            return AWSResponse(None, 400, {}, None), {"Error": {"Code": "AccessDeniedException", "Message": "not authorized"}}
        if model.name == "GetAccountSettings":
            return AWSResponse(None, 200, {}, None), {
                "AccountLimit": {"ConcurrentExecutions": self.concurrency, "UnreservedConcurrentExecutions": self.unreserved},
                "AccountUsage": {},
            }
        request = json.loads(params["body"])  # the serialised request: Service Quotas speaks JSON
        code = request["QuotaCode"]
        self.asked.append((request["ServiceCode"], code))
        table = self.applied if model.name == "GetServiceQuota" else self.defaults
        if code not in table:
            return AWSResponse(None, 400, {}, None), {
                "Error": {"Code": "NoSuchResourceException", "Message": f"{code} not found"}
            }
        quota = {"ServiceCode": request["ServiceCode"], "QuotaCode": code, "QuotaName": QUOTA_NAMES[code], "Value": table[code]}
        return AWSResponse(None, 200, {}, None), {"Quota": quota}


@pytest.fixture
def account() -> Iterator[Account]:
    stubbed = Account()
    with mock_aws():
        boto3.setup_default_session()
        events = boto3.DEFAULT_SESSION.events
        events.register("before-call.service-quotas", stubbed.answer)
        events.register("before-call.lambda.GetAccountSettings", stubbed.answer)
        yield stubbed
    boto3.DEFAULT_SESSION = None


def executable(folder: Path, name: str, target: str | None = None) -> None:
    """An executable `name` in `folder`: a link to `target`, or a script that claims to be Python 3.12."""
    folder.mkdir(exist_ok=True)
    path = folder / name
    if target:
        path.symlink_to(target)
    else:
        path.write_text("#!/bin/sh\n# Answers the version probe: `python3.12 -c 'import sys; assert ...'`\nexit 0\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def python312(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "bin"
    executable(folder, "python3.12")
    monkeypatch.setenv("PATH", str(folder))
    return folder


@pytest.fixture
def samconfig(tmp_path: Path) -> Path:
    path = tmp_path / "samconfig.toml"
    path.write_text('version = 0.1\n\n[default.global.parameters]\nstack_name = "first-stack"\n')
    return path


def preflight(samconfig: Path, *args: str, exit_code: int | None = 0) -> dict[str, Any]:
    """The report as JSON; `exit_code` None takes either (checks a test does not look at may fail)."""
    region = [] if "--region" in args else ["--region", REGION]
    result = runner.invoke(app, ["preflight", "--config-file", str(samconfig), *region, "--json", *args])
    assert exit_code is None or result.exit_code == exit_code, result.output
    return json.loads(result.stdout)


def checks(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {check["code"]: check for check in report["checks"]}


def test_an_account_with_room_passes_every_check(account: Account, python312: Path, samconfig: Path) -> None:
    report = preflight(samconfig)

    assert (report["ok"], report["stack_name"], report["account"], report["region"]) == (
        True,
        "first-stack",
        "123456789012",
        REGION,
    )
    assert {code: check["status"] for code, check in checks(report).items()} == {
        "stack-name": "pass",
        "lambda-concurrency": "pass",
        "query-burst": "pass",
        "lambda-memory": "pass",
        "gpu-vcpus": "pass",
        "index-vcpus": "pass",
        "index-instance-types": "pass",
        "codebuild-region": "pass",
        "codebuild-builds": "pass",
        "network": "pass",
        "instance-zones": "pass",
        "index-instance-zones": "pass",
        "logs-resource-policies": "pass",
        "sam-build-python": "pass",
    }
    # On-demand capacity by default; the quotas have values applied to this account.
    assert account.asked == [("ec2", ON_DEMAND_GPU), ("ec2", ON_DEMAND_STANDARD), ("codebuild", LINUX_LARGE_BUILDS)]
    # The dispatcher's 5, the indexer's 2 and the query function are all counted.
    assert (
        "need 8 (DispatcherConcurrency=5, the indexer's 2, the query function's 1)"
        in checks(report)["lambda-concurrency"]["finding"]
    )
    # The default subnet of the zone without g4dn.xlarge is left out, as the deploy helper leaves it out.
    assert checks(report)["instance-zones"]["finding"].endswith("those in us-east-1e are left out")
    assert all(check["request"] is None for check in report["checks"])


def test_a_new_account_fails_and_gets_the_exact_quota_increases_to_request(
    account: Account, python312: Path, samconfig: Path
) -> None:
    account.concurrency = account.unreserved = 10
    account.applied = {}
    account.defaults = {ON_DEMAND_GPU: 0.0, SPOT_GPU: 0.0, LINUX_LARGE_BUILDS: 1.0, ON_DEMAND_STANDARD: 5.0}

    report = preflight(samconfig, "--parameter-overrides", "QueryMemorySize=4096", exit_code=1)

    found = checks(report)
    # Nothing is reserved, so ten concurrent executions hold the dispatcher's 5, the indexer's 2 and the query function.
    assert found["lambda-concurrency"]["status"] == "pass"
    # ...but not an API burst of 20 on top of them: 3 executions are left for the query function.
    assert found["query-burst"]["status"] == "warn" and "Deploy with QueryBurstLimit=3" in found["query-burst"]["finding"]
    assert found["lambda-memory"]["status"] == "warn" and "QueryMemorySize=3008" in found["lambda-memory"]["finding"]
    assert found["gpu-vcpus"]["status"] == "fail"
    assert found["gpu-vcpus"]["request"] == {
        "service_code": "ec2",
        "quota_code": ON_DEMAND_GPU,
        "quota_name": "Running On-Demand G and VT instances",
        "desired_value": 16,
        "command": f"aws service-quotas request-service-quota-increase --service-code ec2 --quota-code {ON_DEMAND_GPU} --desired-value 16 --region {REGION}",
    }
    # The index job's 16 vCPUs are more than a new account's standard instances quota: a warning, since only a
    # store past IndexMaxTrainRows needs it.
    assert (found["index-vcpus"]["status"], found["index-vcpus"]["request"]["desired_value"]) == ("warn", 16)
    # AWS's default (1) is all Service Quotas knows; new accounts are often given 0, which refuses the build at once.
    builds = found["codebuild-builds"]
    assert builds["status"] == "unknown"
    assert builds["finding"].startswith("unknown — request the quota or pass both image URIs (ImageUri and QueryImageUri)")
    # Service Quotas refuses a request that does not exceed the value it reports.
    assert (builds["request"]["quota_code"], builds["request"]["desired_value"]) == (LINUX_LARGE_BUILDS, 2)
    assert report["ok"] is False


def test_the_lambda_lane_counts_against_a_new_accounts_concurrency_and_memory(
    account: Account, python312: Path, samconfig: Path
) -> None:
    account.concurrency = account.unreserved = 10
    report = preflight(samconfig, "--parameter-overrides", "EmbedLane=auto EmbedMemorySize=10240", exit_code=1)

    found = checks(report)
    # The dispatcher's 5, the indexer's 2, the lane's 2 and 2 for its fallbacks, the query function's 1: 12 > 10.
    concurrency = found["lambda-concurrency"]
    assert concurrency["status"] == "fail"
    assert (
        "LambdaLaneConcurrency=2" in concurrency["finding"] and "or deploy with DispatcherConcurrency=3" in concurrency["finding"]
    )
    memory = found["lambda-memory"]
    assert memory["status"] == "warn" and memory["finding"].endswith(
        "Deploy with EmbedMemorySize=3008, or ask AWS Support to lift the cap (it has no quota code)"
    )


def test_the_table_names_what_failed_and_the_commands_that_request_more(
    account: Account, python312: Path, samconfig: Path
) -> None:
    account.applied = {ON_DEMAND_GPU: 0.0, LINUX_LARGE_BUILDS: 0.0}

    result = runner.invoke(app, ["preflight", "--config-file", str(samconfig), "--region", REGION], terminal_width=250)

    assert result.exit_code == 1
    assert "2 failed (gpu-vcpus, codebuild-builds): fix them before `sam deploy`" in result.output
    assert f"--quota-code {ON_DEMAND_GPU} --desired-value 16 --region {REGION}" in result.output
    assert f"--quota-code {LINUX_LARGE_BUILDS} --desired-value 1 --region {REGION}" in result.output


def test_spot_capacity_checks_the_spot_quota_against_max_vcpus(account: Account, python312: Path, samconfig: Path) -> None:
    account.applied = {SPOT_GPU: 8.0, LINUX_LARGE_BUILDS: 1.0}

    found = checks(preflight(samconfig, "--parameter-overrides", "UseSpot=true MaxvCpus=32"))

    assert ("ec2", SPOT_GPU) in account.asked and ("ec2", ON_DEMAND_GPU) not in account.asked
    assert found["gpu-vcpus"]["status"] == "warn"
    assert "at most 2 jobs run at once" in found["gpu-vcpus"]["finding"]
    assert found["gpu-vcpus"]["request"]["desired_value"] == 32


def test_samconfig_parameters_apply_and_the_command_line_overrides_them(
    account: Account, python312: Path, samconfig: Path
) -> None:
    samconfig.write_text(
        'version = 0.1\n[default.deploy.parameters]\nstack_name = "saved"\nparameter_overrides = "UseSpot=\\"true\\" MaxvCpus=\\"8\\""\n'
    )
    account.applied = {SPOT_GPU: 16.0, LINUX_LARGE_BUILDS: 1.0}

    report = preflight(samconfig, "--parameter-overrides", "MaxvCpus=32", exit_code=0)

    assert report["stack_name"] == "saved"
    assert checks(report)["gpu-vcpus"]["request"]["desired_value"] == 32
    assert account.asked[0] == ("ec2", SPOT_GPU)


def test_images_given_by_uri_need_no_build(account: Account, python312: Path, samconfig: Path) -> None:
    found = checks(
        preflight(samconfig, "--parameter-overrides", "ImageUri=r/w:1", "--parameter-overrides", "QueryImageUri=r/q:1")
    )

    assert found["codebuild-builds"]["status"] == "pass"
    assert ("codebuild", LINUX_LARGE_BUILDS) not in account.asked


def test_too_little_unreserved_concurrency_fails_with_the_increase_or_a_smaller_dispatcher(
    account: Account, python312: Path, samconfig: Path
) -> None:
    # Other functions of the account reserve all but six executions.
    account.concurrency, account.unreserved = 50, 6

    found = checks(preflight(samconfig, exit_code=1))

    check = found["lambda-concurrency"]
    assert check["status"] == "fail"
    assert "DispatcherConcurrency=3" in check["finding"]
    assert (check["request"]["service_code"], check["request"]["quota_code"], check["request"]["desired_value"]) == (
        "lambda",
        LAMBDA_CONCURRENCY,
        52,
    )


def test_checks_aws_will_not_answer_are_unknown_not_passed(account: Account, python312: Path, samconfig: Path) -> None:
    account.denied = True

    found = checks(preflight(samconfig))

    for code in ("lambda-concurrency", "query-burst", "lambda-memory", "gpu-vcpus", "index-vcpus", "codebuild-builds"):
        assert found[code]["status"] == "unknown", code
        assert "AccessDeniedException" in found[code]["finding"]


def test_a_region_without_a_default_vpc_fails_the_network_check(account: Account, python312: Path, samconfig: Path) -> None:
    ec2 = boto3.client("ec2", region_name=REGION)
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    for subnet in ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"]:
        ec2.delete_subnet(SubnetId=subnet["SubnetId"])

    check = checks(preflight(samconfig, exit_code=1))["network"]

    assert check["status"] == "fail" and check["finding"].startswith("no-default-subnets: ")
    ec2.delete_vpc(VpcId=vpc)
    assert checks(preflight(samconfig, exit_code=1))["network"]["finding"].startswith("no-default-vpc: ")


def test_given_subnets_must_be_in_the_given_vpc(account: Account, python312: Path, samconfig: Path) -> None:
    ec2 = boto3.client("ec2", region_name=REGION)
    vpc = ec2.create_vpc(CidrBlock="10.1.0.0/16")["Vpc"]["VpcId"]
    # In a zone that offers g4dn (moto picks one at random otherwise, and us-east-1e offers none).
    ours = [
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.1.{i}.0/24", AvailabilityZone="us-east-1a")["Subnet"]["SubnetId"]
        for i in range(2)
    ]
    elsewhere = ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"][0]["SubnetId"]

    assert (
        checks(preflight(samconfig, "--parameter-overrides", f"VpcId={vpc} SubnetIds={','.join(ours)}"))["network"]["status"]
        == "pass"
    )
    mixed = checks(preflight(samconfig, "--parameter-overrides", f"VpcId={vpc} SubnetIds={ours[0]},{elsewhere}", exit_code=1))[
        "network"
    ]
    assert mixed["status"] == "fail" and elsewhere in mixed["finding"] and ours[0] not in mixed["finding"]
    missing = checks(
        preflight(samconfig, "--parameter-overrides", f"VpcId={vpc} SubnetIds=subnet-0000000000000000f", exit_code=1)
    )["network"]
    assert missing["status"] == "fail" and "subnet-0000000000000000f" in missing["finding"]
    alone = checks(preflight(samconfig, "--parameter-overrides", f"VpcId={vpc}", exit_code=1))["network"]
    assert alone["status"] == "fail" and "go together" in alone["finding"]


def test_a_region_with_ten_logs_resource_policies_has_no_room_for_the_stacks(
    account: Account, python312: Path, samconfig: Path
) -> None:
    logs = boto3.client("logs", region_name=REGION)
    document = json.dumps({"Version": "2012-10-17", "Statement": []})
    for i in range(8):
        logs.put_resource_policy(policyName=f"other-{i}", policyDocument=document)
    # The stack's own, and the one AWS adds for the API's access log (a vended log).
    check = checks(preflight(samconfig))["logs-resource-policies"]
    assert check["status"] == "pass" and "adds 2 (first-stack-failed-jobs, AWSLogDeliveryWrite20150319)" in check["finding"]

    logs.put_resource_policy(policyName="other-8", policyDocument=document)
    check = checks(preflight(samconfig, exit_code=1))["logs-resource-policies"]
    assert check["status"] == "fail" and "other-8" in check["finding"]
    # Without the query API there is no access log.
    assert (
        checks(preflight(samconfig, "--parameter-overrides", "QueryService=false"))["logs-resource-policies"]["status"] == "pass"
    )

    # A region whose vended logs have their policy already, and a redeploy of a stack that has its own, need none more.
    logs.delete_resource_policy(policyName="other-8")
    logs.put_resource_policy(policyName="AWSLogDeliveryWrite20150319", policyDocument=document)
    logs.put_resource_policy(policyName="other-9", policyDocument=document)
    assert checks(preflight(samconfig, exit_code=1))["logs-resource-policies"]["status"] == "fail"
    logs.delete_resource_policy(policyName="other-9")
    logs.put_resource_policy(policyName="first-stack-failed-jobs", policyDocument=document)
    assert checks(preflight(samconfig))["logs-resource-policies"]["status"] == "pass"


def test_sam_build_needs_a_python_3_12_on_path(
    account: Account, tmp_path: Path, samconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pyenv trap: a `python3.12` on PATH that runs another version.
    other = tmp_path / "other"
    executable(other, "python3.12", os.path.realpath(sys.executable))
    monkeypatch.setenv("PATH", str(other))

    check = checks(preflight(samconfig, exit_code=1))["sam-build-python"]
    assert check["status"] == "fail"
    assert str(other / "python3.12") in check["finding"] and "Binary validation failed for python" in check["finding"]

    real = tmp_path / "real"
    executable(real, "python3.12")
    monkeypatch.setenv("PATH", os.pathsep.join([str(other), str(real)]))
    check = checks(preflight(samconfig))["sam-build-python"]
    assert (check["status"], check["finding"]) == ("pass", f"`sam build` finds Python 3.12 at {real / 'python3.12'}")


def test_an_unknown_parameter_stops_before_any_check(account: Account, python312: Path, samconfig: Path) -> None:
    result = runner.invoke(app, ["preflight", "--config-file", str(samconfig), "--parameter-overrides", "MaxVcpus=8"])

    assert result.exit_code == 2
    assert "unknown-parameter" in result.output and "MaxVcpus=8" in result.output
    assert account.asked == []


def test_without_credentials_it_says_so(samconfig: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    result = runner.invoke(app, ["preflight", "--config-file", str(samconfig), "--region", REGION])

    assert result.exit_code == 2
    assert "no-credentials" in result.output


def test_without_a_region_it_says_so(account: Account, samconfig: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))

    result = runner.invoke(app, ["preflight", "--config-file", str(samconfig)])

    assert result.exit_code == 2
    assert "no-region" in result.output and "--region" in result.output


def test_a_codebuild_quota_of_zero_fails_at_once_rather_than_after_an_hour(
    account: Account, python312: Path, samconfig: Path
) -> None:
    account.applied[LINUX_LARGE_BUILDS] = 0.0

    check = checks(preflight(samconfig, exit_code=1))["codebuild-builds"]

    assert check["status"] == "fail" and "refuses the worker and query image build at once" in check["finding"]
    assert "ImageUri and QueryImageUri" in check["finding"] and check["request"]["desired_value"] == 1
    # One build at a time is all the deploy needs now: the builds run one after the other.
    account.applied[LINUX_LARGE_BUILDS] = 1.0
    assert checks(preflight(samconfig))["codebuild-builds"]["status"] == "pass"


def test_a_quota_known_only_by_its_default_never_passes(account: Account, python312: Path, samconfig: Path) -> None:
    account.applied = {}
    account.defaults = {ON_DEMAND_GPU: 64.0, SPOT_GPU: 64.0, LINUX_LARGE_BUILDS: 15.0, ON_DEMAND_STANDARD: 64.0}

    found = checks(preflight(samconfig))

    for code in ("gpu-vcpus", "index-vcpus", "codebuild-builds"):
        assert found[code]["status"] == "unknown", code
        assert found[code]["finding"].startswith("unknown — request the quota"), code
    # A request must exceed what Service Quotas reports, or it is refused.
    desired = [found[code]["request"]["desired_value"] for code in ("gpu-vcpus", "index-vcpus", "codebuild-builds")]
    assert desired == [65, 65, 16]


def test_a_region_without_codebuild_fails_unless_both_images_are_given(
    account: Account, python312: Path, samconfig: Path
) -> None:
    check = checks(preflight(samconfig, "--region", "ca-west-1", exit_code=1))["codebuild-region"]
    assert check["status"] == "fail" and "ca-west-1 has no CodeBuild" in check["finding"]
    assert "scripts/build-and-push.sh" in check["finding"]

    given = "ImageUri=r/w:1 QueryImageUri=r/q:1"
    assert (
        checks(preflight(samconfig, "--region", "ca-west-1", "--parameter-overrides", given, exit_code=None))["codebuild-region"][
            "status"
        ]
        == "pass"
    )


def test_instance_types_no_subnet_zone_offers_fail_and_subnets_in_such_zones_warn(
    account: Account, python312: Path, samconfig: Path
) -> None:
    check = checks(preflight(samconfig, "--parameter-overrides", "InstanceTypes=g9zz.xlarge", exit_code=1))["instance-zones"]
    assert check["status"] == "fail" and "offers g9zz.xlarge" in check["finding"]
    # A family is matched as Batch matches it: any size of it.
    assert checks(preflight(samconfig, "--parameter-overrides", "InstanceTypes=g4dn"))["instance-zones"]["status"] == "pass"

    ec2 = boto3.client("ec2", region_name=REGION)
    vpc = ec2.create_vpc(CidrBlock="10.2.0.0/16")["Vpc"]["VpcId"]
    zones = {"us-east-1a": "10.2.1.0/24", "us-east-1e": "10.2.2.0/24"}
    subnets = [
        ec2.create_subnet(VpcId=vpc, CidrBlock=cidr, AvailabilityZone=zone)["Subnet"]["SubnetId"] for zone, cidr in zones.items()
    ]
    given = f"VpcId={vpc} SubnetIds={','.join(subnets)}"
    check = checks(preflight(samconfig, "--parameter-overrides", given))["instance-zones"]
    assert check["status"] == "warn" and "not offered in us-east-1e" in check["finding"]


def test_too_few_standard_vcpus_for_the_index_job_warn_and_name_the_quota_but_deploy(
    account: Account, python312: Path, samconfig: Path
) -> None:
    account.applied[ON_DEMAND_STANDARD] = 8.0

    report = preflight(samconfig)

    check = checks(report)["index-vcpus"]
    assert report["ok"] is True and check["status"] == "warn"
    # What a stack short of it does: the training waits, is cancelled, and search goes on with the index it has.
    assert "fewer than the index job's 16" in check["finding"]
    assert "waits in RUNNABLE until RunnableTimeoutSeconds cancels it" in check["finding"]
    assert "searches keep working with the older index" in check["finding"]
    assert check["request"] == {
        "service_code": "ec2",
        "quota_code": ON_DEMAND_STANDARD,
        "quota_name": QUOTA_NAMES[ON_DEMAND_STANDARD],
        "desired_value": 16,
        "command": "aws service-quotas request-service-quota-increase --service-code ec2 "
        f"--quota-code {ON_DEMAND_STANDARD} --desired-value 16 --region {REGION}",
    }
    # Exactly the job's vCPUs is enough.
    account.applied[ON_DEMAND_STANDARD] = 16.0
    assert checks(preflight(samconfig))["index-vcpus"]["status"] == "pass"
    # Instance types outside the standard families count against other quotas, which this does not check.
    check = checks(preflight(samconfig, "--parameter-overrides", "IndexInstanceTypes=c7i.4xlarge,inf1.6xlarge"))["index-vcpus"]
    assert check["status"] == "warn" and "also names inf1.6xlarge" in check["finding"]
    for standard in ("i3.4xlarge", "im4gn.4xlarge", "r7iz.4xlarge", "m7i-flex.4xlarge"):
        parameters = f"IndexInstanceTypes={standard}"
        assert checks(preflight(samconfig, "--parameter-overrides", parameters))["index-vcpus"]["status"] == "pass", standard


@pytest.mark.parametrize(
    ("types", "status", "found"),
    [
        ("c7i.4xlarge,c6i.4xlarge,m7i.4xlarge,m6i.4xlarge", "pass", "c6i.4xlarge, c7i.4xlarge, m6i.4xlarge, m7i.4xlarge hold"),
        # 32 GiB less what ECS keeps back still holds 28,000 MiB; a whole family has sizes that do.
        ("c7i", "pass", "hold the index job's 16 vCPUs and 28,000 MiB"),
        ("optimal", "pass", "optimal hold"),
        # Too few vCPUs, too little memory, or Arm, which the x86_64 worker image does not run on.
        ("c7i.2xlarge,m7i.2xlarge", "warn", "no type of c7i.2xlarge, m7i.2xlarge holds"),
        ("c7g.4xlarge", "warn", "on x86_64"),
        ("default_arm64", "warn", "waits in RUNNABLE"),
        # Only the sizes that hold it are named; Batch starts those for the job.
        ("c7i.2xlarge,c7i.4xlarge", "pass", "c7i.4xlarge hold"),
        # A name no instance type has: Batch refuses the compute environment, and the deploy with it.
        ("c7i.4xlrge,m7i.4xlarge", "fail", "names c7i.4xlrge, no instance type"),
        ("c7i.4xlarge,c9zz", "fail", "names c9zz, no instance type"),
    ],
)
def test_index_instance_types_must_hold_the_index_job(
    account: Account, samconfig: Path, types: str, status: str, found: str
) -> None:
    parameters = deploy_parameters("first-stack", [f"IndexInstanceTypes={types}"], samconfig=samconfig)

    check = check_index_instance_types(boto3.client("ec2", region_name=REGION), parameters)

    assert (check.status, check.code) == (status, "index-instance-types")
    assert found in check.finding


def test_index_instance_types_no_subnet_zone_offers_warn_without_failing_the_deploy(
    account: Account, python312: Path, samconfig: Path
) -> None:
    # An instance type us-east-1 does not offer.
    report = preflight(samconfig, "--parameter-overrides", "IndexInstanceTypes=hpc7a.48xlarge")

    check = checks(report)["index-instance-zones"]
    assert report["ok"] is True and check["status"] == "warn"
    assert "offers hpc7a.48xlarge" in check["finding"] and "waits in RUNNABLE" in check["finding"]
    # Only the default subnets Batch is handed count: those whose zones offer the GPU instance types.
    assert "us-east-1e" not in check["finding"]
    # A family is matched as Batch matches it: any size of it.
    assert (
        checks(preflight(samconfig, "--parameter-overrides", "IndexInstanceTypes=c7i"))["index-instance-zones"]["status"]
        == "pass"
    )

    # Given subnets, one in a zone without them: the index job starts in the other.
    ec2 = boto3.client("ec2", region_name=REGION)
    vpc = ec2.create_vpc(CidrBlock="10.3.0.0/16")["Vpc"]["VpcId"]
    zones = {"us-east-1a": "10.3.1.0/24", "us-east-1e": "10.3.2.0/24"}
    subnets = [
        ec2.create_subnet(VpcId=vpc, CidrBlock=cidr, AvailabilityZone=zone)["Subnet"]["SubnetId"] for zone, cidr in zones.items()
    ]
    check = checks(preflight(samconfig, "--parameter-overrides", f"VpcId={vpc} SubnetIds={','.join(subnets)}"))[
        "index-instance-zones"
    ]
    assert check["status"] == "pass" and "1 of the GPU workers' 2 subnets; not in us-east-1e" in check["finding"]
    # Only in that zone: no index job can start, which still fails nothing the deploy needs now.
    only = f"VpcId={vpc} SubnetIds={subnets[1]}"
    check = checks(preflight(samconfig, "--parameter-overrides", only, exit_code=None))["index-instance-zones"]
    assert check["status"] == "warn" and "(us-east-1e) offers c7i.4xlarge" in check["finding"]


def test_an_index_instance_type_that_does_not_exist_fails_the_deploy(account: Account, python312: Path, samconfig: Path) -> None:
    report = preflight(samconfig, "--parameter-overrides", "IndexInstanceTypes=c7i.4xlrge", exit_code=1)

    assert [check["code"] for check in report["checks"] if check["status"] == "fail"] == ["index-instance-types"]


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("First-Stack", "must start with a lowercase letter"),
        ("clip-pipeline-for-the-marketing-teams", "more than the 33 the bucket names leave in us-east-1"),
    ],
)
def test_a_stack_name_the_buckets_cannot_carry_fails_before_deploying(
    account: Account, python312: Path, samconfig: Path, name: str, problem: str
) -> None:
    check = checks(preflight(samconfig, "--stack-name", name, exit_code=1))["stack-name"]

    assert check["status"] == "fail" and problem in check["finding"]
