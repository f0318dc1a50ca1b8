"""The image builds: CodeBuild in the region, and the account's concurrent-build quota.

The deploy builds the images one after the other (template.yaml, QueryImage waits for WorkerImage),
so one concurrent build suffices; with none, CodeBuild refuses the first StartBuild at once ("Cannot
have more than 0 builds in queue") and the stack rolls back.
"""

from __future__ import annotations

from clip_pipeline.preflight.findings import Check, ClientFactory, QuotaRequest, Status, default_only, quota
from clip_pipeline.preflight.parameters import DeployParameters

#: The quota of ImageBuild's compute type, BUILD_GENERAL1_LARGE on Linux.
LINUX_LARGE_BUILDS = ("codebuild", "L-4DDC4A99")
#: Regions where CloudFormation has no AWS::CodeBuild::Project (cfn-lint 1.58.0's region data, which
#: follows CloudFormation's resource specification per region).
REGIONS_WITHOUT_CODEBUILD = frozenset({"ap-east-2", "ca-west-1", "mx-central-1"})
BY_HAND = "build the images with scripts/build-and-push.sh and deploy with ImageUri and QueryImageUri"


def check_codebuild_region(parameters: DeployParameters, region: str) -> Check:
    if not parameters.image_builds:
        return Check(
            "codebuild-region", Status.PASS, "no image is built during the deploy (ImageUri and QueryImageUri are given)"
        )
    if region in REGIONS_WITHOUT_CODEBUILD:
        return Check(
            "codebuild-region",
            Status.FAIL,
            f"{region} has no CodeBuild, which builds the {' and '.join(parameters.image_builds)} images during the deploy: {BY_HAND}",
        )
    return Check("codebuild-region", Status.PASS, f"{region} has CodeBuild")


def check_codebuild(client: ClientFactory, parameters: DeployParameters) -> Check:
    builds = parameters.image_builds
    if not builds:
        return Check(
            "codebuild-builds", Status.PASS, "no image is built during the deploy (ImageUri and QueryImageUri are given)"
        )
    found = quota(client("service-quotas"), *LINUX_LARGE_BUILDS)
    request = QuotaRequest(*LINUX_LARGE_BUILDS, found.name, 1)
    images = " and ".join(builds)
    if found.value < 1:
        return Check(
            "codebuild-builds",
            Status.FAIL,
            f"{found.described()}: CodeBuild refuses the {images} image build at once and the deploy rolls back. "
            f"Request 1, or {BY_HAND}",
            request,
        )
    if not found.applied:
        return default_only("codebuild-builds", found, request, "pass both image URIs (ImageUri and QueryImageUri)")
    return Check(
        "codebuild-builds", Status.PASS, f"{found.name}: {found.value}; the {images} image builds run one after the other"
    )
