"""template.yaml as CloudFormation would create it, for the settings a deployer chooses.

The template is translated with aws-sam-translator (the SAM transform), then its conditions are
evaluated for the parameters given, as CloudFormation does: resources whose condition is false are
left out, and each Fn::If takes its branch. Nothing is deployed and no model is loaded.
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

import pytest
from samtranslator.translator.transform import transform
from samtranslator.yaml_helper import yaml_parse

from clip_pipeline.emulator import TEMPLATE, _NoManagedPolicies

_NO_VALUE = object()
REGISTRY = "123456789012.dkr.ecr.us-east-1.amazonaws.com"


@functools.cache
def _sam_template() -> dict[str, Any]:
    template = yaml_parse(TEMPLATE.read_text())
    # What `sam package` leaves for CloudFormation: code folders become S3 locations.
    for logical_id, resource in template["Resources"].items():
        for prop in ("CodeUri", "ContentUri"):
            if prop in resource.get("Properties", {}):
                resource["Properties"][prop] = f"s3://artifacts/{logical_id}"
    return template


def stack(**overrides: str) -> dict[str, Any]:
    """The translated template with conditions applied: what CloudFormation would create."""
    template = copy.deepcopy(_sam_template())
    parameters: dict[str, Any] = {name: spec.get("Default") for name, spec in template["Parameters"].items()}
    parameters.update(overrides)
    translated = transform(template, dict(parameters), _NoManagedPolicies())
    for name, spec in template["Parameters"].items():
        if spec["Type"] == "CommaDelimitedList":
            parameters[name] = parameters[name].split(",")

    @functools.cache
    def condition(name: str) -> bool:
        return bool(evaluate(translated["Conditions"][name]))

    def evaluate(node: Any) -> Any:
        if isinstance(node, dict) and len(node) == 1:
            [(function, argument)] = node.items()
            if function == "Ref" and argument in parameters:
                return parameters[argument]
            if function == "Condition":
                return condition(argument)
            if function == "Fn::Equals":
                return evaluate(argument[0]) == evaluate(argument[1])
            if function == "Fn::Not":
                return not evaluate(argument[0])
            if function == "Fn::And":
                return all(evaluate(item) for item in argument)
            if function == "Fn::Or":
                return any(evaluate(item) for item in argument)
            if function == "Fn::Join":
                return argument[0].join(evaluate(argument[1]))
        return node

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if node == {"Ref": "AWS::NoValue"}:
                return _NO_VALUE
            if list(node) == ["Fn::If"]:
                name, when_true, when_false = node["Fn::If"]
                return resolve(when_true if condition(name) else when_false)
            if list(node) == ["Ref"] and node["Ref"] in parameters:
                return parameters[node["Ref"]]
            resolved = {key: resolve(value) for key, value in node.items()}
            return {key: value for key, value in resolved.items() if value is not _NO_VALUE}
        if isinstance(node, list):
            return [item for item in (resolve(item) for item in node) if item is not _NO_VALUE]
        return node

    return {
        section: {
            logical_id: resolve(item)
            for logical_id, item in translated.get(section, {}).items()
            if "Condition" not in item or condition(item["Condition"])
        }
        for section in ("Resources", "Outputs")
    }


def routes(created: dict[str, Any]) -> dict[str, dict[str, Any]]:
    body = created["Resources"]["QueryApi"]["Properties"]["Body"]
    return {path: item["x-amazon-apigateway-any-method"] for path, item in body["paths"].items()}


def test_the_query_api_routes_everything_to_the_function_and_requires_iam_signatures_by_default() -> None:
    created = stack()
    api_routes = routes(created)
    assert set(api_routes) == {"/", "/{proxy+}"}
    for route in api_routes.values():
        assert route["security"] == [{"AWS_IAM": []}]
        integration = route["x-amazon-apigateway-integration"]
        assert integration["payloadFormatVersion"] == "2.0"
        assert "QueryFunction.Arn" in integration["uri"]["Fn::Sub"]
    scheme = created["Resources"]["QueryApi"]["Properties"]["Body"]["components"]["securitySchemes"]["AWS_IAM"]
    assert scheme["x-amazon-apigateway-authtype"] == "awsSigv4"
    assert "awscurl --service execute-api" in created["Outputs"]["QueryExampleCommand"]["Value"]["Fn::Sub"]


def test_query_auth_none_opens_every_route() -> None:
    created = stack(QueryAuth="NONE")
    assert all("security" not in route for route in routes(created).values())
    assert created["Outputs"]["QueryExampleCommand"]["Value"]["Fn::Sub"].startswith("curl ")


def test_query_service_false_leaves_out_the_query_api_and_its_image() -> None:
    created = stack(QueryService="false")
    assert not [name for name in [*created["Resources"], *created["Outputs"]] if name.startswith("Query")]
    # Nothing left refers to them (the image build role, the deploy helper), and the worker's image is still built.
    assert '"Query' not in json.dumps(created)
    assert {"ImageBuild", "WorkerImage"} <= set(created["Resources"])


def test_images_given_by_uri_are_not_built() -> None:
    worker, query = f"{REGISTRY}/worker:1", f"{REGISTRY}/query:1"
    created = stack(ImageUri=worker, QueryImageUri=query)
    assert not {"ImageBuild", "ImageSource", "WorkerImage", "QueryImage"} & set(created["Resources"])
    assert created["Resources"]["QueryFunction"]["Properties"]["Code"] == {"ImageUri": query}
    only_query = stack(QueryImageUri=query)
    assert {"ImageBuild", "WorkerImage"} <= set(only_query["Resources"]) and "QueryImage" not in only_query["Resources"]


def test_default_deploy_builds_both_images_in_one_project() -> None:
    resources = stack()["Resources"]
    worker, query = resources["WorkerImage"]["Properties"], resources["QueryImage"]["Properties"]
    assert worker["Project"] == query["Project"] == {"Ref": "ImageBuild"}
    assert (worker["Dockerfile"], query["Dockerfile"]) == ("batch_job/Dockerfile", "functions/query/Dockerfile")
    # The query image bakes in the stack's model: query vectors must compare with the stored ones.
    assert (query["ClipModel"], query["ClipPretrained"]) == (worker["ClipModel"], worker["ClipPretrained"])
    assert resources["QueryFunction"]["Properties"]["Code"] == {"ImageUri": {"Fn::GetAtt": ["QueryImage", "ImageUri"]}}


@pytest.mark.parametrize(
    ("labels", "query_labels"), [("", "default"), ("cat,dog", "cat,dog"), ("s3://bucket/labels.txt", "s3://bucket/labels.txt")]
)
def test_keyword_settings_reach_the_workers_and_the_query_api(labels: str, query_labels: str) -> None:
    resources = stack(ClipLabels=labels, KeywordsTopK="3")["Resources"]
    container = resources["WorkerJobDefinition"]["Properties"]["ContainerProperties"]
    worker_environment = {item["Name"]: item["Value"] for item in container["Environment"]}
    assert (worker_environment["CLIP_LABELS"], worker_environment["KEYWORDS_TOP_K"]) == (labels, "3")
    query_environment = resources["QueryFunction"]["Properties"]["Environment"]["Variables"]
    # /classify always has a label set, even where the workers write no keywords.
    assert (query_environment["CLIP_LABELS"], query_environment["KEYWORDS_TOP_K"]) == (query_labels, "3")


def test_the_query_function_reads_and_never_writes_buckets() -> None:
    resources = stack()["Resources"]
    role = resources["QueryFunctionRole"]["Properties"]
    actions = {
        action
        for policy in role["Policies"]
        for statement in policy["PolicyDocument"]["Statement"]
        if statement["Effect"] == "Allow"
        for action in ([statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"])
    }
    assert actions == {"s3:GetObject", "s3:ListBucket"}
    # Logs and traces only: no managed policy that could grant S3 writes.
    managed = {arn.rsplit("/", 1)[-1] for arn in role["ManagedPolicyArns"]}
    assert managed == {"AWSLambdaBasicExecutionRole", "AWSXrayWriteOnlyAccess"}


def test_the_query_function_gives_up_before_the_http_api_does_and_loads_no_weights_at_run_time() -> None:
    function = stack()["Resources"]["QueryFunction"]["Properties"]
    assert function["PackageType"] == "Image"
    assert function["Timeout"] < 30
    assert function["Environment"]["Variables"]["HF_HUB_OFFLINE"] == "1"


def test_query_alarms_notify_the_alarm_topic() -> None:
    resources = stack()["Resources"]
    for name in ("QueryApiErrorsAlarm", "QueryApiLatencyAlarm"):
        alarm = resources[name]["Properties"]
        assert alarm["AlarmActions"] == [{"Ref": "AlarmTopic"}]
        assert {item["Name"] for item in alarm["Dimensions"]} == {"ApiId", "Stage"}
