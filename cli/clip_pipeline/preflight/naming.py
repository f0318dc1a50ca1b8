"""The stack's name: it names the buckets (lowercase, at most 63 characters with the account and
region) and the two functions that may pull the query image."""

from __future__ import annotations

import re

from clip_pipeline.preflight.findings import Check, Status

#: The longest name template.yaml derives from the stack's: `<stack>-output-<account>-<region>`.
BUCKET_SUFFIX = "-output-{account}-{region}"
BUCKET_NAME_CHARS = 63


def longest_stack_name(account: str, region: str) -> int:
    return BUCKET_NAME_CHARS - len(BUCKET_SUFFIX.format(account=account, region=region))


def check_stack_name(stack_name: str, account: str, region: str) -> Check:
    longest = longest_stack_name(account, region)
    problems = []
    if not re.fullmatch(r"[a-z][a-z0-9-]*", stack_name):
        problems.append("must start with a lowercase letter and hold only lowercase letters, digits and hyphens")
    if len(stack_name) > longest:
        problems.append(f"has {len(stack_name)} characters, more than the {longest} the bucket names leave in {region}")
    if problems:
        return Check(
            "stack-name",
            Status.FAIL,
            f"the stack name {stack_name!r} names the buckets (<stack>-input-{account}-{region}) and "
            + " and ".join(problems)
            + ": CloudFormation would fail creating them",
        )
    return Check("stack-name", Status.PASS, f"{stack_name!r} fits the bucket names (at most {longest} characters here)")
