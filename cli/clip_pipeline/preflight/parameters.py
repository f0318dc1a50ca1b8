"""The parameter values a `sam deploy` of template.yaml would use: the template's defaults, then
samconfig.toml's parameter_overrides (what `sam deploy --guided` saved), then the ones given."""

from __future__ import annotations

import functools
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samtranslator.yaml_helper import yaml_parse

from clip_pipeline.emulator import TEMPLATE
from clip_pipeline.preflight.findings import PreflightError
from clip_pipeline.stack import SAMCONFIG, samconfig_setting

#: A log group under /aws/vendedlogs/ (the API's access log) is delivered under this account-level
#: CloudWatch Logs resource policy, which AWS adds the first time a region needs it.
VENDED_LOGS_POLICY = "AWSLogDeliveryWrite20150319"


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
    def lane_fallback_concurrency(self) -> int:
        """The most dispatcher invocations at once on the lane's fallback queue (DispatcherLaneFallbacks)."""
        mapping = _template(self.template)["Resources"]["DispatcherLaneFallbacks"]["Properties"]
        return int(mapping["ScalingConfig"]["MaximumConcurrency"])

    @property
    def lambda_lane(self) -> bool:
        """Whether the stack has the embedding function (EmbedLane lambda or auto)."""
        return self.values["EmbedLane"] != "batch"

    @property
    def image_builds(self) -> list[str]:
        """The images the deploy builds in CodeBuild: those not given by URI."""
        builds = [("worker", not self.values["ImageUri"]), ("query", self.query_service and not self.values["QueryImageUri"])]
        return [name for name, built in builds if built]

    def _requirement(self, job_definition: str, kind: str) -> int:
        container = _template(self.template)["Resources"][job_definition]["Properties"]["ContainerProperties"]
        return next(int(item["Value"]) for item in container["ResourceRequirements"] if item["Type"] == kind)

    @property
    def job_vcpus(self) -> int:
        """The vCPUs one worker job asks for (WorkerJobDefinition), the least a GPU quota must allow."""
        return self._requirement("WorkerJobDefinition", "VCPU")

    @property
    def index_job_vcpus(self) -> int:
        """The vCPUs the index job asks for (IndexJobDefinition), the least the standard-instance quota must allow."""
        return self._requirement("IndexJobDefinition", "VCPU")

    @property
    def index_job_memory(self) -> int:
        """The MiB the index job asks for (IndexJobDefinition), which an IndexInstanceTypes instance must hold."""
        return self._requirement("IndexJobDefinition", "MEMORY")

    @property
    def indexer_concurrency(self) -> int:
        """The most indexer invocations at once (its queue's MaximumConcurrency)."""
        mapping = _template(self.template)["Resources"]["IndexerFunctionShards"]["Properties"]
        return int(mapping["ScalingConfig"]["MaximumConcurrency"])

    @property
    def logs_resource_policies(self) -> list[str]:
        """The names of the CloudWatch Logs resource policies the stack needs in its region."""
        resources = _template(self.template)["Resources"].values()
        names = [
            resource["Properties"]["PolicyName"] for resource in resources if resource["Type"] == "AWS::Logs::ResourcePolicy"
        ]
        own = [
            name["Fn::Sub"].replace("${AWS::StackName}", self.stack_name) if isinstance(name, dict) else name for name in names
        ]
        return own + ([VENDED_LOGS_POLICY] if self.query_service else [])


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
