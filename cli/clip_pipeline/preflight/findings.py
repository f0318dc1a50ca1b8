"""What a check finds: its status, what it found, and the quota increase that would fix it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from botocore.exceptions import ClientError

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


@dataclass(frozen=True)
class Quota:
    name: str
    value: int
    #: False when Service Quotas knows only AWS's default, which new accounts are often not given.
    applied: bool

    def described(self) -> str:
        return f"{self.name}: {self.value}" if self.applied else f"{self.name}: AWS's default is {self.value}"


def quota(quotas: Any, service_code: str, quota_code: str) -> Quota:
    """A quota's value for this account, or AWS's default where Service Quotas has no applied value."""
    try:
        found = quotas.get_service_quota(ServiceCode=service_code, QuotaCode=quota_code)["Quota"]
        applied = True
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "NoSuchResourceException":
            raise
        found = quotas.get_aws_default_service_quota(ServiceCode=service_code, QuotaCode=quota_code)["Quota"]
        applied = False
    return Quota(found["QuotaName"], int(found["Value"]), applied)


def default_only(code: str, found: Quota, request: QuotaRequest, alternative: str) -> Check:
    """The finding for a quota whose default would do, but whose value for this account is not known.

    Service Quotas refuses an increase that does not exceed the value it reports (here, the default):
    the request asks for at least one more.
    """
    return Check(
        code,
        Status.UNKNOWN,
        f"unknown — request the quota or {alternative}: Service Quotas reports only AWS's default for this "
        f"account ({found.name}: {found.value}), and new accounts are often given less",
        QuotaRequest(request.service_code, request.quota_code, request.quota_name, max(request.desired_value, found.value + 1)),
    )
