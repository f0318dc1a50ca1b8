"""A deployed (or emulated) stack, as the CLI sees it: its outputs and its job definition."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
    TokenRetrievalError,
)
from botocore.exceptions import ConnectionError as NetworkError

from clip_shared.aws import CLIENT_CONFIG

if TYPE_CHECKING:
    from clip_store import StorageSettings

SAMCONFIG = Path(__file__).resolve().parents[2] / "samconfig.toml"
FALLBACK_STACK_NAME = "clip-embedding-pipeline"


class StackError(RuntimeError):
    """The stack cannot be read; the message names it and what to do."""


def samconfig_setting(key: str, samconfig: Path = SAMCONFIG) -> Any:
    """A setting of `sam deploy` in samconfig.toml's default environment: its deploy section, else global."""
    try:
        config = tomllib.loads(samconfig.read_text()).get("default", {})
    except OSError:
        return None
    for command in ("deploy", "global"):
        value = config.get(command, {}).get("parameters", {}).get(key)
        if value is not None:
            return value
    return None


def default_stack_name(samconfig: Path = SAMCONFIG) -> str:
    """The stack name `sam deploy` uses: samconfig.toml's default environment."""
    return samconfig_setting("stack_name", samconfig) or FALLBACK_STACK_NAME


@dataclass(frozen=True)
class Clients:
    """One set of clients, pointed at AWS or at an emulator."""

    endpoint_url: str | None = None
    region: str | None = None

    def client(self, service: str, attempts: int | None = None) -> Any:
        """A client with the pipeline's retries, or `attempts` in all (a probe that should fail fast)."""
        retries = {"mode": "standard", "total_max_attempts": attempts}
        config = CLIENT_CONFIG.merge(Config(retries=retries)) if attempts else CLIENT_CONFIG
        return boto3.client(service, endpoint_url=self.endpoint_url, region_name=self.region, config=config)

    def storage(self) -> StorageSettings:
        """The same endpoint and region for LanceDB's own S3 client (the vector store) as for boto3's."""
        # Here, not at the top: clip_store loads lancedb (2 s), which most commands never need.
        from clip_store import StorageSettings

        defaults = StorageSettings.from_env()
        return StorageSettings(endpoint=self.endpoint_url or defaults.endpoint, region=self.region or defaults.region)


@dataclass(frozen=True)
class Stack:
    name: str
    outputs: dict[str, str]
    #: The worker's environment as the job definition sets it (model, weights, output bucket...).
    worker_environment: dict[str, str]

    def output(self, key: str) -> str:
        try:
            return self.outputs[key]
        except KeyError:
            raise StackError(f"stack {self.name} has no output {key}; was it deployed from this template?") from None

    @property
    def model(self) -> str:
        return self.worker_environment.get("CLIP_MODEL", "ViT-B-32")

    @property
    def pretrained(self) -> str:
        return self.worker_environment.get("CLIP_PRETRAINED", "openai")

    @property
    def output_prefix(self) -> str:
        return self.worker_environment.get("OUTPUT_PREFIX", "")


def plain_environment(variables: dict[str, Any] | list[dict[str, Any]]) -> dict[str, str]:
    """Environment variables as AWS hands them to code: strings.

    moto's CloudFormation keeps resolved numbers as numbers and an empty string as [].
    """
    pairs = variables.items() if isinstance(variables, dict) else ((item["name"], item["value"]) for item in variables)
    return {name: "" if value == [] else str(value) for name, value in pairs}


def read_stack(clients: Clients, name: str) -> Stack:
    # The first call of every stack command: an endpoint that cannot be reached ends the command in
    # seconds rather than after the minute of retries a worker's clients ride out.
    try:
        described = clients.client("cloudformation", attempts=3).describe_stacks(StackName=name)["Stacks"][0]
    except ClientError as exc:
        raise StackError(
            f"cannot read stack {name}: {exc.response['Error']['Message']} "
            "(deploy it with `sam deploy`, or pass --stack-name / --endpoint-url)"
        ) from exc
    outputs = {item["OutputKey"]: item["OutputValue"] for item in described.get("Outputs", [])}
    stack = Stack(name, outputs, {})
    definition = clients.client("batch").describe_job_definitions(jobDefinitions=[stack.output("JobDefinitionArn")])[
        "jobDefinitions"
    ]
    environment = definition[0]["containerProperties"].get("environment", []) if definition else []
    return Stack(name, outputs, plain_environment(environment))


def function_environment(clients: Clients, stack: Stack, output: str) -> dict[str, str]:
    """The environment of the stack's function named by `output`, as deployed."""
    configuration = clients.client("lambda").get_function_configuration(FunctionName=stack.output(output))
    return plain_environment(configuration.get("Environment", {}).get("Variables", {}))


#: Client errors that say the caller's credentials are the problem, not the request.
_CREDENTIALS_REFUSED = frozenset(
    {
        "ExpiredToken",
        "ExpiredTokenException",
        "RequestExpired",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "InvalidToken",
    }
)


def explain(exc: BaseException) -> str | None:
    """What to do about an AWS failure, in one line, or None when `exc` is not one.

    The CLI's edge turns these into that line: a missing region, credentials or network is the
    user's to fix and a traceback tells them nothing they can act on.
    """
    settings = "--region, AWS_REGION, or `aws configure`"
    if isinstance(exc, NoRegionError):
        return f"no AWS region: pass {settings}"
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return (
            "no AWS credentials: run `aws configure` or `aws sso login`, or set AWS_PROFILE "
            "(an emulator such as `clip-pipeline local --keep` takes any: AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local)"
        )
    if isinstance(exc, TokenRetrievalError):
        return f"the AWS session has expired: run `aws sso login` ({exc})"
    if isinstance(exc, ProfileNotFound):
        return f"{exc}: set AWS_PROFILE to one `aws configure list-profiles` shows"
    if isinstance(exc, (NetworkError, ConnectionClosedError, ReadTimeoutError)):
        return f"{exc}: check the network, --endpoint-url and --region (is an emulator's endpoint still running?)"
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        said = str(exc.response.get("Error", {}).get("Message", ""))
        operation = exc.operation_name
        if code in _CREDENTIALS_REFUSED:
            return f"AWS refused the credentials ({code}: {said}): refresh them (`aws sso login`) or set AWS_PROFILE"
        if "AccessDenied" in code or code in {"UnauthorizedOperation", "Forbidden", "403"}:
            return f"AWS denied {operation} ({said or code}): use credentials allowed to operate the stack"
        return f"AWS answered {operation} with {code}: {said} (run the command again; if it persists, check the stack in the CloudFormation console)"
    if isinstance(exc, BotoCoreError):
        return f"{exc}: check the network, credentials and --region"
    return None
