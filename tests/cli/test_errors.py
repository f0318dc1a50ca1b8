"""Every stack command ends a failure in one line that says what to do, and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from typer.testing import CliRunner, Result

from clip_pipeline.app import _hub_reachable, app, kept_commands
from clip_pipeline.stack import Clients, Stack

runner = CliRunner()


@pytest.fixture(autouse=True)
def fresh_aws_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """boto3's process-wide session keeps the credentials it found first; each command here starts
    without them, as a command in a shell of its own does."""
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)


#: Each command that reads a stack, with the arguments it needs to get that far.
STACK_COMMANDS = [
    ["status"],
    ["search", "a red bicycle"],
    ["similar", "s3://bucket/cat.jpg"],
    ["embed-text", "a red bicycle"],
    ["backfill", "s3://bucket/prefix/"],
    ["retry", "--dry-run"],
    ["redrive", "--dry-run"],
    ["index", "--dry-run"],
    ["serve", "--port", "0"],
    ["preflight"],
]


def no_aws_settings(tmp_path: Path) -> dict[str, str | None]:
    """An environment with no credentials or region from anywhere: variables, files, instance metadata."""
    missing = str(tmp_path / "no-such-file")
    return {
        **{name: None for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")},
        **{name: None for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_CONTAINER_CREDENTIALS_FULL_URI")},
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": None,
        "AWS_SHARED_CREDENTIALS_FILE": missing,
        "AWS_CONFIG_FILE": missing,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def assert_one_line(result: Result, expected: str) -> None:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", STACK_COMMANDS, ids=lambda command: command[0])
def test_missing_credentials_say_how_to_set_them(deployed: tuple[Clients, Stack], tmp_path: Path, command: list[str]) -> None:
    clients, stack = deployed
    settings = {**no_aws_settings(tmp_path), "AWS_DEFAULT_REGION": clients.region}
    arguments = [*command, "--stack-name", stack.name, "--endpoint-url", clients.endpoint_url or ""]
    assert_one_line(runner.invoke(app, arguments, env=settings), "no AWS credentials")


@pytest.mark.parametrize("command", STACK_COMMANDS, ids=lambda command: command[0])
def test_missing_region_says_how_to_set_it(tmp_path: Path, command: list[str]) -> None:
    settings = {**no_aws_settings(tmp_path), "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}
    assert_one_line(runner.invoke(app, command, env=settings), "no AWS region")


def test_an_endpoint_nobody_answers_says_so_in_seconds(deployed: tuple[Clients, Stack]) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    for command in STACK_COMMANDS[:-1]:
        result = runner.invoke(app, [*command, "--endpoint-url", endpoint, "--region", "us-east-1"])
        assert_one_line(result, f'Could not connect to the endpoint URL: "{endpoint}/"')
        assert "check the network, --endpoint-url and --region" in result.output


def test_the_commands_local_keep_prints_run_as_printed(deployed: tuple[Clients, Stack], tmp_path: Path) -> None:
    clients, stack = deployed
    export, _, status = kept_commands(clients, stack)
    settings: dict[str, str | None] = {**no_aws_settings(tmp_path)}
    for assignment in shlex.split(export)[1:]:
        name, _, value = assignment.partition("=")
        settings[name] = value
    words = shlex.split(status)
    assert words[0] == "clip-pipeline"
    result = runner.invoke(app, [*words[1:], "--json"], env=settings)
    assert result.exit_code == 0, result.output


@pytest.mark.skipif(_hub_reachable(), reason="the model hub answers here: this is about a machine where it does not")
def test_weights_the_hub_cannot_give_fail_in_one_line_without_the_hub_client_s_retries(tmp_path: Path) -> None:
    environment = {**os.environ, "HF_HOME": str(tmp_path / "empty-cache")}
    environment.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run(
        [sys.executable, "-m", "clip_pipeline", "embed-text", "--standalone", "a cat", "--pretrained", "openai"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and result.stdout == ""
    assert lines[0] == "Loading ViT-B-32 (openai) ..." and len(lines) == 2, result.stderr
    assert lines[1].startswith("error: cannot load ViT-B-32 weights 'openai' (offline?): pass --pretrained")
