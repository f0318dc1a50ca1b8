"""CloudWatch Logs resource policies: 10 per region, a limit AWS does not raise.

The stack adds one for its EventBridge log groups, and its API's access log is delivered under
AWSLogDeliveryWrite20150319, which AWS adds to the region the first time a vended log needs it.
"""

from __future__ import annotations

from clip_pipeline.preflight.findings import Check, ClientFactory, Status
from clip_pipeline.preflight.parameters import DeployParameters

LOGS_RESOURCE_POLICIES = 10


def check_logs_resource_policies(client: ClientFactory, parameters: DeployParameters) -> Check:
    # One page holds them all: a region has at most 10.
    existing = sorted(policy["policyName"] for policy in client("logs").describe_resource_policies()["resourcePolicies"])
    new = [name for name in parameters.logs_resource_policies if name not in existing]
    added = f"the stack adds {len(new)}" + (f" ({', '.join(new)})" if new else "")
    if len(existing) + len(new) <= LOGS_RESOURCE_POLICIES:
        return Check(
            "logs-resource-policies",
            Status.PASS,
            f"{len(existing)} of the region's {LOGS_RESOURCE_POLICIES} CloudWatch Logs resource policies used; {added}",
        )
    return Check(
        "logs-resource-policies",
        Status.FAIL,
        f"{len(existing)} of the region's {LOGS_RESOURCE_POLICIES} CloudWatch Logs resource policies are used (a limit AWS does not raise) "
        f"and {added}: the deploy would fail after the image builds. Delete one no longer needed with "
        f"`aws logs delete-resource-policy --policy-name NAME`; the region's: {', '.join(existing)}",
    )
