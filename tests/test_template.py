"""template.yaml as CloudFormation would create it, for the settings a deployer chooses.

The template is translated with aws-sam-translator (the SAM transform), then its conditions are
evaluated for the parameters given, as CloudFormation does: resources whose condition is false are
left out, and each Fn::If takes its branch. Nothing is deployed and no model is loaded.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import importlib.metadata
import json
import re
import tomllib
from typing import Any

import pytest
from samtranslator.translator.transform import transform
from samtranslator.yaml_helper import yaml_parse

from clip_pipeline.emulator import REPOSITORY, TEMPLATE, _NoManagedPolicies
from clip_shared import keys
from scripts import image_tag

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


def test_query_service_false_leaves_out_the_query_api_but_not_the_image_the_indexer_runs() -> None:
    created = stack(QueryService="false")
    image = {"QueryRepository", "QueryImage", "QueryRepositoryUri", "QueryImageUri"}
    assert not [name for name in [*created["Resources"], *created["Outputs"]] if name.startswith("Query") and name not in image]
    assert image <= {*created["Resources"], *created["Outputs"]}
    # Nothing left refers to the API's parts (the image build role, the deploy helper); both images are still built.
    full = stack()
    api = {name for name in [*full["Resources"], *full["Outputs"]] if name.startswith("Query")} - image
    assert api and not [name for name in api if name in json.dumps(created)]
    assert {"ImageBuild", "WorkerImage"} <= set(created["Resources"])
    indexer = created["Resources"]["IndexerFunction"]["Properties"]
    assert indexer["Code"]["ImageUri"] == {"Fn::GetAtt": ["QueryImage", "ImageUri"]}


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


def test_the_indexer_trains_up_to_its_limit_and_alarms_on_training_it_leaves() -> None:
    resources = stack(IndexMaxTrainRows="500000")["Resources"]
    environment = resources["IndexerFunction"]["Properties"]["Environment"]["Variables"]
    assert environment["INDEX_MAX_TRAIN_ROWS"] == "500000"
    assert resources["IndexerFunction"]["Properties"]["MemorySize"] <= 3008  # what a new account may use
    alarm = resources["IndexTrainingDeferredAlarm"]["Properties"]
    # The metric the indexer emits (tests/indexer), in its Powertools namespace and service dimension.
    assert (alarm["Namespace"], alarm["MetricName"]) == (environment["POWERTOOLS_METRICS_NAMESPACE"], "IndexTrainingDeferred")
    assert alarm["Dimensions"] == [{"Name": "service", "Value": environment["POWERTOOLS_SERVICE_NAME"]}]
    assert alarm["AlarmActions"] == [{"Ref": "AlarmTopic"}]
    # What `sam local invoke --env-vars events/env.json` gives the handler is what a default deploy does.
    sample = json.loads((REPOSITORY / "events" / "env.json").read_text())["IndexerFunction"]
    assert sample["INDEX_MAX_TRAIN_ROWS"] == str(_sam_template()["Parameters"]["IndexMaxTrainRows"]["Default"])


def test_the_lambda_lane_reaches_what_a_job_child_does_and_hands_back_what_it_cannot_finish() -> None:
    # EmbedLane batch, the default: no function; its queues stay, so that turning the lane off loses nothing.
    assert "EmbedFunction" not in stack()["Resources"] and "EmbedQueue" in stack()["Resources"]
    resources = stack(EmbedLane="auto")["Resources"]
    function = resources["EmbedFunction"]["Properties"]
    environment = function["Environment"]["Variables"]
    # What `sam local invoke --env-vars events/env.json` gives the handler names the same variables.
    assert set(json.loads((REPOSITORY / "events" / "env.json").read_text())["EmbedFunction"]) == set(environment)
    job = resources["WorkerJobDefinition"]["Properties"]
    job_environment = {item["Name"]: item["Value"] for item in job["ContainerProperties"]["Environment"]}
    # The lane's one attempt, then the Batch job's: the lane never records what a retry may fix.
    assert int(environment["JOB_ATTEMPTS"]) == 1 + int(job_environment["JOB_ATTEMPTS"]) == 1 + job["RetryStrategy"]["Attempts"]
    # The model, one decoding process and its budget fit the smallest memory the parameter allows.
    assert int(environment["DECODE_WORKERS"]) == 1
    assert int(environment["DECODE_MEMORY_MB"]) <= _sam_template()["Parameters"]["EmbedMemorySize"]["MinValue"] // 2
    for name in (
        "OUTPUT_BUCKET",
        "OUTPUT_PREFIX",
        "CLIP_MODEL",
        "CLIP_PRETRAINED",
        "MAX_IMAGE_PIXELS",
        "CLIP_LABELS",
        "KEYWORDS_TOP_K",
    ):
        assert environment[name] == job_environment[name], name
    # The decoding code reaches what a job child's role does, and the lane's two queues, nothing more.
    role = resources[function["Role"]["Fn::GetAtt"][0]]["Properties"]
    worker = resources["WorkerJobRole"]["Properties"]
    lane_statements = [s for p in role["Policies"] for s in p["PolicyDocument"]["Statement"]]
    worker_statements = [s for p in worker["Policies"] for s in p["PolicyDocument"]["Statement"]]
    queues = {
        ("sqs:ReceiveMessage", json.dumps({"Fn::GetAtt": ["EmbedQueue", "Arn"]})),
        ("sqs:DeleteMessage", json.dumps({"Fn::GetAtt": ["EmbedQueue", "Arn"]})),
        ("sqs:GetQueueAttributes", json.dumps({"Fn::GetAtt": ["EmbedQueue", "Arn"]})),
        ("sqs:SendMessage", json.dumps({"Fn::GetAtt": ["LaneFallbackQueue", "Arn"]})),
    }
    assert _granted(lane_statements) - _granted(worker_statements) == queues
    # One try on Lambda; what it does not finish goes to the fallback queue, which the dispatcher reads.
    embed_queue = resources["EmbedQueue"]["Properties"]
    assert embed_queue["RedrivePolicy"] == {
        "deadLetterTargetArn": {"Fn::GetAtt": ["LaneFallbackQueue", "Arn"]},
        "maxReceiveCount": 1,
    }
    assert embed_queue["VisibilityTimeout"] > function["Timeout"]
    assert resources["DispatcherLaneFallbacks"]["Properties"]["EventSourceArn"] == {"Fn::GetAtt": ["LaneFallbackQueue", "Arn"]}
    assert resources["Dispatcher"]["Properties"]["Environment"]["Variables"]["EMBED_QUEUE_URL"] == {"Ref": "EmbedQueue"}
    assert resources["LaneFallbackQueue"]["Properties"]["RedrivePolicy"]["deadLetterTargetArn"] == {
        "Fn::GetAtt": ["UploadDeadLetterQueue", "Arn"]
    }


def _granted(statements: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {
        (action, json.dumps(resource))
        for statement in statements
        for action in ([statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"])
        for resource in (statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]])
    }


def test_trainings_past_the_indexers_bound_run_as_a_batch_job_that_reaches_only_the_stores() -> None:
    resources = stack()["Resources"]
    indexer = resources["IndexerFunction"]["Properties"]
    assert indexer["Environment"]["Variables"]["INDEX_JOB_QUEUE"] == {"Ref": "IndexJobQueue"}
    assert indexer["Environment"]["Variables"]["INDEX_JOB_DEFINITION"] == {"Ref": "IndexJobDefinition"}
    indexer_statements = [
        statement
        for policy in resources["IndexerFunctionRole"]["Properties"]["Policies"]
        for statement in policy["PolicyDocument"]["Statement"]
    ]
    submitted = {resource for action, resource in _granted(indexer_statements) if action == "batch:SubmitJob"}
    # The CPU queue and the index job only: never the GPU queue, nor the worker's job.
    assert submitted == {json.dumps({"Ref": "IndexJobQueue"}), json.dumps({"Ref": "IndexJobDefinition"})}
    job = resources["IndexJobDefinition"]["Properties"]["ContainerProperties"]
    worker = resources["WorkerJobDefinition"]["Properties"]["ContainerProperties"]
    # The worker image ships clip_store and bakes the label prompts' vectors that probe recall.
    assert job["Image"] == worker["Image"] and job["Command"] == ["python", "-m", "clip_indexer.train"]
    assert job["JobRoleArn"] == {"Fn::GetAtt": ["IndexJobRole", "Arn"]}
    assert {item["Name"] for item in job["Environment"]} >= {"OUTPUT_BUCKET", "OUTPUT_PREFIX"}
    job_statements = [
        statement
        for policy in resources["IndexJobRole"]["Properties"]["Policies"]
        for statement in policy["PolicyDocument"]["Statement"]
    ]
    writable = {
        resource for action, resource in _granted(job_statements) if action.startswith("s3:") and action != "s3:ListBucket"
    }
    assert writable and all("store/*" in resource or "tombstones/*" in resource for resource in writable)
    # What it writes beside the store: the training lease it trains under, and the job marker it releases.
    patterns = [json.loads(resource)["Fn::Sub"].split("${OutputPrefix}")[1] for resource in writable]
    for key in (keys.training_job_key("", "m"), keys.training_lease_key("", "m")):
        assert any(fnmatch.fnmatch(key, pattern) for pattern in patterns), key
    # A store whose recall falls short at every setting alarms, on the metric the indexer emits (tests/indexer).
    alarm = resources["SearchRecallBelowTargetAlarm"]["Properties"]
    environment = indexer["Environment"]["Variables"]
    assert (alarm["Namespace"], alarm["MetricName"]) == (environment["POWERTOOLS_METRICS_NAMESPACE"], "SearchRecallBelowTarget")
    assert alarm["Dimensions"] == [{"Name": "service", "Value": environment["POWERTOOLS_SERVICE_NAME"]}]
    assert alarm["AlarmActions"] == [{"Ref": "AlarmTopic"}]


def test_every_change_the_store_must_follow_reaches_the_indexer_and_it_may_act_on_it() -> None:
    resources = stack()["Resources"]

    def notified(bucket: str) -> list[tuple[str, list[Any]]]:
        configurations = resources[bucket]["Properties"]["NotificationConfiguration"]["QueueConfigurations"]
        return [
            (configuration["Event"], configuration.get("Filter", {}).get("S3Key", {}).get("Rules", []))
            for configuration in configurations
            if configuration["Queue"] == {"Fn::GetAtt": ["IndexerQueue", "Arn"]}
        ]

    # Removals, lifecycle expirations (S3 sends no ObjectRemoved for them), shards and rejections.
    assert [event for event, _ in notified("InputBucket")] == ["s3:ObjectRemoved:*", "s3:LifecycleExpiration:*"]
    prefixes = [json.dumps(rules[0]["Value"]) for _, rules in notified("OutputBucket")]
    assert len(prefixes) == 2 and "parquet/" in prefixes[0] and "rejected/" in prefixes[1]
    indexer = resources["IndexerFunction"]["Properties"]
    assert indexer["Environment"]["Variables"]["UPLOAD_QUEUE_URL"] == {"Ref": "UploadQueue"}
    statements = [
        statement
        for policy in resources["IndexerFunctionRole"]["Properties"]["Policies"]
        for statement in policy["PolicyDocument"]["Statement"]
    ]
    granted = _granted(statements)
    assert ("sqs:SendMessage", json.dumps({"Fn::GetAtt": ["UploadQueue", "Arn"]})) in granted
    readable = {resource for action, resource in granted if action == "s3:GetObject"}
    assert any("rejected/*" in resource for resource in readable) and any("tombstones/*" in resource for resource in readable)
    assert any("tombstones/*" in resource for action, resource in granted if action == "s3:PutObject")


def rule_failures(**overrides: str) -> list[str]:
    """The AssertDescriptions of the template's Rules that CloudFormation would refuse the parameters with."""
    template = _sam_template()
    parameters: dict[str, Any] = {name: str(spec.get("Default", "")) for name, spec in template["Parameters"].items()}
    parameters.update(overrides)
    for name, spec in template["Parameters"].items():
        if spec["Type"] == "CommaDelimitedList":
            parameters[name] = parameters[name].split(",")

    def evaluate(node: Any) -> Any:
        [(function, argument)] = node.items()
        if function == "Ref":
            return parameters[argument]
        if function == "Fn::Not":
            return not evaluate(argument[0])
        if function == "Fn::Equals":
            return evaluate(argument[0]) == argument[1]
        if function == "Fn::EachMemberEquals":
            return all(member == argument[1] for member in evaluate(argument[0]))
        raise AssertionError(f"no evaluator for {function}")

    return [
        assertion["AssertDescription"]
        for rule in template["Rules"].values()
        if evaluate(rule["RuleCondition"])
        for assertion in rule["Assertions"]
        if not evaluate(assertion["Assert"])
    ]


def test_vpc_and_subnets_are_given_together_or_not_at_all() -> None:
    assert rule_failures() == []
    assert rule_failures(VpcId="vpc-1", SubnetIds="subnet-a,subnet-b") == []
    # VpcId alone would be ignored (the default VPC's subnets used); SubnetIds alone would leave the
    # security group without a VPC.
    [alone] = rule_failures(VpcId="vpc-1")
    assert "SubnetIds" in alone
    [alone] = rule_failures(SubnetIds="subnet-a")
    assert "VpcId" in alone


def test_the_dispatcher_is_capped_by_its_queue_and_reserves_no_concurrency() -> None:
    resources = stack(DispatcherConcurrency="7")["Resources"]
    # A reservation must leave the account 100 unreserved executions: it fails on a new account's 10.
    assert "ReservedConcurrentExecutions" not in resources["Dispatcher"]["Properties"]
    assert resources["DispatcherUploads"]["Properties"]["ScalingConfig"] == {"MaximumConcurrency": "7"}


def test_the_query_function_defaults_to_memory_a_new_account_may_use() -> None:
    memory = stack()["Resources"]["QueryFunction"]["Properties"]["MemorySize"]
    assert int(memory) <= 3008


def test_every_route_of_the_query_api_is_throttled() -> None:
    created = stack(QueryAuth="NONE", QueryRateLimit="5", QueryBurstLimit="9")
    settings = created["Resources"]["QueryApiApiGatewayDefaultStage"]["Properties"]["DefaultRouteSettings"]
    assert (settings["ThrottlingRateLimit"], settings["ThrottlingBurstLimit"]) == ("5", "9")


def test_functions_use_no_layer_from_outside_the_stack() -> None:
    resources = stack()["Resources"]
    functions = {name: item["Properties"] for name, item in resources.items() if item["Type"] == "AWS::Lambda::Function"}
    assert {"Dispatcher", "DeployHelper"} <= set(functions)
    for name, properties in functions.items():
        for layer in properties.get("Layers", []):
            # A Ref to the stack's own layer; an ARN string would name another account's (and partition's) layer.
            assert isinstance(layer, dict) and resources[layer["Ref"]]["Type"] == "AWS::Lambda::LayerVersion", name


def _pinned(requirement: str, lines: list[str]) -> str:
    [pin] = [line.split("==", 1)[1].strip() for line in lines if line.split("[")[0].split("==")[0].strip() == requirement]
    return pin


def test_the_powertools_the_tests_run_is_the_powertools_that_ships() -> None:
    layer = (REPOSITORY / "layers" / "shared" / "requirements.txt").read_text().splitlines()
    project = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]["dependencies"]
    shipped = _pinned("aws-lambda-powertools", layer)
    assert _pinned("aws-lambda-powertools", project) == shipped
    assert importlib.metadata.version("aws-lambda-powertools") == shipped


def test_image_builds_fetch_their_source_when_they_start() -> None:
    resources = stack()["Resources"]
    # The layer, not a 10-minute download URL: a build queued behind the other (one concurrent build
    # allowed) would start after the URL expired.
    for name in ("WorkerImage", "QueryImage"):
        assert resources[name]["Properties"]["Source"] == {"Ref": "ImageSource"}
    buildspec = resources["ImageBuild"]["Properties"]["Source"]["BuildSpec"]
    assert 'aws lambda get-layer-version-by-arn --arn "$SOURCE_LAYER_ARN"' in buildspec
    statements = resources["ImageBuildRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
    assert {"Effect": "Allow", "Action": "lambda:GetLayerVersion", "Resource": {"Ref": "ImageSource"}} in statements


def test_the_deploy_helper_is_its_own_function_with_its_own_log_group() -> None:
    resources = stack()["Resources"]
    helper = resources["DeployHelper"]["Properties"]
    assert helper["Code"] == {"S3Bucket": "artifacts", "S3Key": "DeployHelper"}
    assert helper["Handler"] == "app.handler"
    assert helper["LoggingConfig"] == {"LogGroup": {"Ref": "DeployHelperLogGroup"}}
    assert resources["DeployHelperLogGroup"]["Properties"]["RetentionInDays"] == 30


def test_the_stack_adds_one_logs_resource_policy_covering_its_event_log_groups() -> None:
    resources = stack()["Resources"]
    # Account-level, at most 10 per region: one per stack, for every /aws/events/<stack>-* group.
    [policy] = [item["Properties"] for item in resources.values() if item["Type"] == "AWS::Logs::ResourcePolicy"]
    document = json.loads(re.sub(r"\$\{([^}]*)\}", r"\1", policy["PolicyDocument"]["Fn::Sub"]))
    assert document["Statement"][0]["Resource"].endswith(":log-group:/aws/events/AWS::StackName-*")
    assert resources["FailedJobsLogGroup"]["Properties"]["LogGroupName"]["Fn::Sub"].startswith("/aws/events/${AWS::StackName}-")


def test_every_skipped_finding_is_justified_next_to_its_resource() -> None:
    """checkov skips carry a comment; a cfn-lint ignore follows a comment naming each rule it ignores."""
    lines = TEMPLATE.read_text().splitlines()
    resources = _sam_template()["Resources"]
    skipped = 0
    for name, resource in resources.items():
        for skip in resource.get("Metadata", {}).get("checkov", {}).get("skip", []):
            assert len(skip.get("comment", "")) > 20, (name, skip["id"])
            skipped += 1
        ignored = resource.get("Metadata", {}).get("cfn-lint", {}).get("config", {}).get("ignore_checks", [])
        if ignored:
            start = lines.index(f"  {name}:")
            at = next(i for i in range(start, len(lines)) if lines[i].strip().startswith("ignore_checks:"))
            reason = []
            for line in reversed(lines[:at]):
                if not line.strip().startswith("#"):
                    break
                reason.append(line)
            assert all(rule in " ".join(reason) for rule in ignored), (name, ignored)
            skipped += len(ignored)
    assert skipped > 0


def test_the_images_start_from_the_ecr_public_gallery_by_a_base_the_build_resolves_to_its_digest() -> None:
    # Docker Hub limits anonymous pulls per address, and CodeBuild's addresses are shared.
    for dockerfile in ("batch_job/Dockerfile", "functions/query/Dockerfile"):
        text = (REPOSITORY / dockerfile).read_text()
        assert [line for line in text.splitlines() if line.startswith("FROM ")] == ["FROM ${BASE_IMAGE}"], dockerfile
        assert image_tag.base_image(text).startswith("public.ecr.aws/"), dockerfile
    # scripts/push-image.sh builds FROM the digest, which the tag covers.
    script = (REPOSITORY / "scripts" / "push-image.sh").read_text()
    assert '--build-arg BASE_IMAGE="$base_digest"' in script and 'BASE_IMAGE="$base_digest" CLIP_MODEL=' in script


def test_failures_another_attempt_can_fix_are_retried_and_the_worker_knows_its_last_attempt_and_its_time() -> None:
    definition = stack(JobTimeoutSeconds="5400")["Resources"]["WorkerJobDefinition"]["Properties"]
    strategy = definition["RetryStrategy"]
    rules = [
        (rule.get("OnExitCode") or rule.get("OnReason") or rule.get("OnStatusReason"), rule["Action"])
        for rule in strategy["EvaluateOnExit"]
    ]
    # Batch takes the first rule that matches, and allows five.
    assert len(rules) <= 5 and rules[-1] == ("*", "EXIT")
    assert ("75", "RETRY") in rules and ("13*", "RETRY") in rules  # S3 would not serve; killed or crashed (137: OOM)
    environment = {item["Name"]: item["Value"] for item in definition["ContainerProperties"]["Environment"]}
    assert int(environment["JOB_ATTEMPTS"]) == int(strategy["Attempts"])
    # The child stops short of the attempt's timeout and exits 75 for a retry, which Batch does not give a timed-out job.
    assert int(environment["JOB_TIMEOUT_SECONDS"]) == int(definition["Timeout"]["AttemptDurationSeconds"]) == 5400


def test_jobs_that_cannot_start_are_cancelled_and_alarmed_on() -> None:
    resources = stack(RunnableTimeoutSeconds="7200")["Resources"]
    actions = resources["JobQueue"]["Properties"]["JobStateTimeLimitActions"]
    assert {action["Reason"] for action in actions} >= {
        "CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY",
        "MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT",
    }
    assert all(
        (action["Action"], action["State"], action["MaxTimeSeconds"]) == ("CANCEL", "RUNNABLE", "7200") for action in actions
    )
    pattern = resources["StuckJobsRule"]["Properties"]["EventPattern"]
    assert pattern["detail"]["statusReason"] == [{"prefix": "Canceled by JobStateTimeLimit"}]
    alarm = resources["StuckJobsAlarm"]["Properties"]
    assert alarm["AlarmActions"] == [{"Ref": "AlarmTopic"}]
    assert alarm["Dimensions"] == [{"Name": "RuleName", "Value": {"Ref": "StuckJobsRule"}}]


#: vCPUs and GiB of the instance types IndexInstanceTypes may name (EC2's instance type pages).
INSTANCE_SIZES = {
    "c7i.4xlarge": (16, 32),
    "c6i.4xlarge": (16, 32),
    "m7i.4xlarge": (16, 64),
    "m6i.4xlarge": (16, 64),
    "r7i.4xlarge": (16, 128),
}


def test_index_trainings_run_on_cpu_instances_that_cost_nothing_idle_and_hold_the_job() -> None:
    resources = stack(RunnableTimeoutSeconds="7200")["Resources"]
    queue = resources["IndexJobQueue"]["Properties"]
    assert queue["ComputeEnvironmentOrder"] == [{"Order": 1, "ComputeEnvironment": {"Ref": "IndexComputeEnvironment"}}]
    # A training that can never start is cancelled and alarmed on, as a worker job is.
    assert queue["JobStateTimeLimitActions"] == resources["JobQueue"]["Properties"]["JobStateTimeLimitActions"]
    for rule in ("FailedJobsRule", "StuckJobsRule"):
        watched = resources[rule]["Properties"]["EventPattern"]["detail"]["jobQueue"]
        assert {"Ref": "IndexJobQueue"} in watched and {"Ref": "JobQueue"} in watched, rule
    compute = resources["IndexComputeEnvironment"]["Properties"]["ComputeResources"]
    gpu = resources["GpuComputeEnvironment"]["Properties"]["ComputeResources"]
    # Nothing runs, and nothing is paid, while no training waits; no GPU AMI, no Spot reclaim of a training of hours.
    assert (compute["MinvCpus"], compute["Type"], compute["AllocationStrategy"]) == (0, "EC2", "BEST_FIT_PROGRESSIVE")
    assert compute["Ec2Configuration"] == [{"ImageType": "ECS_AL2023"}]
    assert stack(UseSpot="true")["Resources"]["IndexComputeEnvironment"]["Properties"]["ComputeResources"]["Type"] == "EC2"
    # The GPU workers' network, instance role and locked-down launch template.
    for setting in ("Subnets", "SecurityGroupIds", "InstanceRole", "LaunchTemplate"):
        assert compute[setting] == gpu[setting], setting
    assert compute["InstanceTypes"] == ["c7i.4xlarge", "c6i.4xlarge", "m7i.4xlarge", "m6i.4xlarge"]
    assert not any(name.startswith(("g", "p")) for name in compute["InstanceTypes"])
    # The job fits the smallest instance Batch may start for it, after what ECS keeps back (32 MiB for its
    # agent, the kernel's share: AWS advises 5%), and one job fills the environment.
    requirements = {
        item["Type"]: int(item["Value"])
        for item in resources["IndexJobDefinition"]["Properties"]["ContainerProperties"]["ResourceRequirements"]
    }
    assert set(requirements) == {"VCPU", "MEMORY"}  # no GPU
    for overrides in ({}, {"IndexInstanceTypes": "r7i.4xlarge,m7i.4xlarge"}):
        types = stack(**overrides)["Resources"]["IndexComputeEnvironment"]["Properties"]["ComputeResources"]["InstanceTypes"]
        vcpus, gib = min(INSTANCE_SIZES[name] for name in types)
        assert requirements["VCPU"] <= vcpus and requirements["MEMORY"] <= gib * 1024 * 0.95 - 32, overrides
    assert requirements["VCPU"] <= int(compute["MaxvCpus"]) < 2 * requirements["VCPU"]
    # The capped k-means sample (2M vectors: 6.1 GB of 768-d float32s) takes at most a quarter of the job's
    # memory, a margin for the training's own copies and the table's pages beside it.
    from clip_store.maintain import IndexPolicy  # here: clip_store loads lancedb, which no other test here needs

    assert IndexPolicy().max_train_sample * 768 * 4 <= requirements["MEMORY"] * 2**20 / 4
    outputs = stack()["Outputs"]
    assert outputs["IndexJobQueueArn"]["Value"] == {"Ref": "IndexJobQueue"}


def _statements(role: dict[str, Any]) -> list[dict[str, Any]]:
    return [statement for policy in role["Policies"] for statement in policy["PolicyDocument"]["Statement"]]


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def test_the_query_image_is_built_after_the_worker_image_never_beside_it() -> None:
    resources = stack()["Resources"]
    # Accounts allowed one concurrent build refuse a second StartBuild at once.
    assert resources["QueryImage"]["Properties"]["After"] == {"Ref": "WorkerImage"}
    for name in ("WorkerImage", "QueryImage"):
        # A build's end is delivered only once the rule and its permission exist.
        assert set(resources[name]["DependsOn"]) == {"ImageBuildEndedRule", "ImageBuildEndedPermission"}
    given_worker = stack(ImageUri=f"{REGISTRY}/worker:1")["Resources"]
    assert "After" not in given_worker["QueryImage"]["Properties"] and "WorkerImage" not in given_worker


def test_every_end_of_an_image_build_reaches_the_deploy_helper_before_cloudformation_gives_up() -> None:
    resources = stack()["Resources"]
    rule = resources["ImageBuildEndedRule"]["Properties"]
    pattern = rule["EventPattern"]
    assert (pattern["source"], pattern["detail-type"]) == (["aws.codebuild"], ["CodeBuild Build State Change"])
    assert pattern["detail"]["project-name"] == [{"Ref": "ImageBuild"}]
    # Every final state of CodeBuild's StatusType: the helper answers from each.
    assert set(pattern["detail"]["build-status"]) == {"SUCCEEDED", "FAILED", "FAULT", "STOPPED", "TIMED_OUT"}
    [target] = rule["Targets"]
    assert target["Arn"] == {"Fn::GetAtt": ["DeployHelper", "Arn"]}
    permission = resources["ImageBuildEndedPermission"]["Properties"]
    assert (permission["Principal"], permission["SourceArn"]) == (
        "events.amazonaws.com",
        {"Fn::GetAtt": ["ImageBuildEndedRule", "Arn"]},
    )
    # Queued past its timeout or building past its own, a build ends (TIMED_OUT) within the resource's wait.
    project = resources["ImageBuild"]["Properties"]
    for name in ("WorkerImage", "QueryImage"):
        service_timeout = int(resources[name]["Properties"]["ServiceTimeout"])
        assert (project["QueuedTimeoutInMinutes"] + project["TimeoutInMinutes"]) * 60 < service_timeout
    # The build answers nothing itself, and never holds the response URL.
    buildspec = project["Source"]["BuildSpec"]
    assert "post_build" not in buildspec and "CFN_RESPONSE_URL" not in buildspec and "curl -fsS -X PUT" not in buildspec


def test_only_the_deploy_helper_reads_the_requests_waiting_for_their_builds() -> None:
    resources = stack()["Resources"]
    helper = resources["DeployHelper"]["Properties"]
    path = helper["Environment"]["Variables"]["IMAGE_REQUESTS_PATH"]["Fn::Sub"]
    [ssm] = [s for s in _statements(resources["DeployHelperRole"]["Properties"]) if "ssm:GetParameter" in s["Action"]]
    assert ssm["Resource"]["Fn::Sub"].endswith(f":parameter{path}*")
    build_role = json.dumps(resources["ImageBuildRole"]["Properties"])
    assert "ssm:" not in build_role


def test_the_api_access_log_is_a_vended_log_group_that_does_not_grow_the_account_policy() -> None:
    group = stack()["Resources"]["QueryApiLogGroup"]["Properties"]
    assert group["LogGroupName"]["Fn::Sub"].startswith("/aws/vendedlogs/")


def test_gpu_instances_default_to_one_size_and_subnets_in_zones_that_offer_it() -> None:
    resources = stack()["Resources"]
    assert resources["GpuComputeEnvironment"]["Properties"]["ComputeResources"]["InstanceTypes"] == ["g4dn.xlarge"]
    assert resources["DefaultNetwork"]["Properties"]["InstanceTypes"] == ["g4dn.xlarge"]
    assert stack(InstanceTypes="g5.xlarge,g4dn.xlarge")["Resources"]["DefaultNetwork"]["Properties"]["InstanceTypes"] == [
        "g5.xlarge",
        "g4dn.xlarge",
    ]


def _grants(statements: list[dict[str, Any]], action: str, prefix: str) -> list[str]:
    """The output-bucket resources `action` is allowed on, as key patterns with OutputPrefix = `prefix`."""
    patterns = []
    for statement in statements:
        if statement["Effect"] != "Allow" or action not in _listed(statement["Action"]):
            continue
        for resource in _listed(statement["Resource"]):
            text = resource.get("Fn::Sub", "") if isinstance(resource, dict) else ""
            if text.startswith("${OutputBucket.Arn}/"):
                patterns.append(text.removeprefix("${OutputBucket.Arn}/").replace("${OutputPrefix}", prefix))
    return patterns


@pytest.mark.parametrize("prefix", ["", "pipeline/"])
def test_the_worker_writes_only_its_results_and_never_reads_or_writes_the_vector_store(prefix: str) -> None:
    statements = _statements(stack()["Resources"]["WorkerJobRole"]["Properties"])
    puts, gets = _grants(statements, "s3:PutObject", prefix), _grants(statements, "s3:GetObject", prefix)
    model, manifest = keys.model_id("ViT-B-32", "openai"), "manifest-0123"
    written = [
        keys.parquet_key(prefix, model, manifest, 3),
        keys.events_key(prefix, model, manifest, 3),
        keys.vector_key(prefix, model, "uploads", "a/b.jpg"),
        keys.document_key(prefix, model, "uploads", "a/b.jpg"),
        keys.journal_key(prefix, manifest, 3),
    ]
    read = [
        keys.manifest_prefix(prefix, manifest) + keys.manifest_shard_name(3),
        keys.journal_key(prefix, manifest, 3),
        keys.parquet_key(prefix, model, manifest, 3),
        keys.events_key(prefix, model, manifest, 3),
        f"{prefix}labels/animals.txt",
    ]
    for key in written:
        assert any(fnmatch.fnmatchcase(key, pattern) for pattern in puts), key
    for key in read:
        assert any(fnmatch.fnmatchcase(key, pattern) for pattern in gets), key
    untouchable = [
        keys.store_prefix(prefix, model) + "data/0.lance",
        keys.manifest_prefix(prefix, manifest) + keys.manifest_shard_name(3),
        keys.rejection_key(prefix, "uploads", "a/b.jpg"),
        keys.retry_key(prefix, "s3://uploads/a/b.jpg", "event-1"),
    ]
    for key in untouchable:
        assert not any(fnmatch.fnmatchcase(key, pattern) for pattern in puts), key
    assert not any(fnmatch.fnmatchcase(untouchable[0], pattern) for pattern in gets)


def test_worker_instances_keep_the_instance_role_from_containers_and_encrypt_their_volume() -> None:
    resources = stack()["Resources"]
    data = resources["WorkerLaunchTemplate"]["Properties"]["LaunchTemplateData"]
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert data["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
    [volume] = data["BlockDeviceMappings"]
    assert volume["Ebs"]["Encrypted"] is True
    # Batch runs these jobs on the host's network, where the hop limit does not tell a container from the host.
    user_data = data["UserData"]["Fn::Base64"]
    assert "iptables -I OUTPUT -d 169.254.169.254/32 -m owner ! --uid-owner 0 -j REJECT" in user_data
    dockerfile = (REPOSITORY / "batch_job" / "Dockerfile").read_text()
    assert "USER worker" in dockerfile and "--uid 1000" in dockerfile
    template = resources["GpuComputeEnvironment"]["Properties"]["ComputeResources"]["LaunchTemplate"]
    assert template["LaunchTemplateId"] == {"Ref": "WorkerLaunchTemplate"}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # With the lane off, the dispatcher drains its queues: requests sent, or handed back, before it was turned off.
        ({}, {"DispatcherUploads", "IndexerFunctionShards", "DispatcherLaneFallbacks", "DispatcherLaneLeftovers"}),
        (
            {"QueryService": "false"},
            {"DispatcherUploads", "IndexerFunctionShards", "DispatcherLaneFallbacks", "DispatcherLaneLeftovers"},
        ),
        # The Lambda lane: the embedding function reads its queue, the dispatcher the lane's fallback queue too.
        (
            {"EmbedLane": "auto"},
            {"DispatcherUploads", "IndexerFunctionShards", "EmbedFunctionRequests", "DispatcherLaneFallbacks"},
        ),
    ],
)
def test_functions_read_only_their_own_queues(overrides: dict[str, str], expected: set[str]) -> None:
    resources = stack(**overrides)["Resources"]
    mappings = {name: item["Properties"] for name, item in resources.items() if item["Type"] == "AWS::Lambda::EventSourceMapping"}
    assert set(mappings) == expected
    read: dict[str, list[Any]] = {}
    for mapping in mappings.values():
        read.setdefault(mapping["FunctionName"]["Ref"], []).append(mapping["EventSourceArn"])
    for function, queues in read.items():
        role = resources[function]["Properties"]["Role"]["Fn::GetAtt"][0]
        # What reads a queue (the indexer may also send to the dispatcher's: docs/search.md, "Removals").
        grants = [s for s in _statements(resources[role]["Properties"]) if "sqs:ReceiveMessage" in _listed(s["Action"])]
        assert len(grants) == 1, function
        granted = grants[0]["Resource"] if isinstance(grants[0]["Resource"], list) else [grants[0]["Resource"]]
        assert sorted(map(json.dumps, granted)) == sorted(map(json.dumps, queues)), function
        assert {"sqs:ReceiveMessage", "sqs:DeleteMessage"} <= set(grants[0]["Action"])
    for name, item in resources.items():
        if item["Type"] == "AWS::IAM::Role":
            # SAM's `Events: SQS` would attach this: receive and delete on every queue of the account.
            assert not [arn for arn in item["Properties"].get("ManagedPolicyArns", []) if "SQS" in json.dumps(arn)], name
    indexer = resources["IndexerFunctionShards"]
    assert indexer["Properties"]["ScalingConfig"] == {"MaximumConcurrency": 2}


def test_only_the_functions_that_run_the_query_image_may_pull_it() -> None:
    resources = stack(EmbedLane="auto")["Resources"]
    [statement] = resources["QueryRepository"]["Properties"]["RepositoryPolicyText"]["Statement"]
    allowed = [arn["Fn::Sub"].rsplit(":function:", 1)[1] for arn in statement["Condition"]["ArnEquals"]["aws:sourceArn"]]
    runs_it = [
        name for name, item in resources.items() if item["Type"] == "AWS::Lambda::Function" and "ImageUri" in json.dumps(item)
    ]
    assert sorted(runs_it) == ["EmbedFunction", "IndexerFunction", "QueryFunction"]
    named = [resources[name]["Properties"]["FunctionName"]["Fn::Sub"] for name in runs_it]
    assert sorted(allowed) == sorted(named)
    assert "*" not in json.dumps(statement["Condition"])


@pytest.mark.parametrize("overrides", [{}, {"QueryService": "false"}, {"EmbedLane": "lambda"}])
def test_throttles_and_uploads_nobody_takes_are_alarmed_on(overrides: dict[str, str]) -> None:
    resources = stack(**overrides)["Resources"]
    age = resources["UploadQueueAgeAlarm"]["Properties"]
    assert (age["MetricName"], age["Dimensions"]) == (
        "ApproximateAgeOfOldestMessage",
        [{"Name": "QueueName", "Value": {"Fn::GetAtt": ["UploadQueue", "QueueName"]}}],
    )
    throttles = resources["LambdaThrottlesAlarm"]["Properties"]
    functions = {
        metric["MetricStat"]["Metric"]["Dimensions"][0]["Value"]["Ref"]
        for metric in throttles["Metrics"]
        if "MetricStat" in metric
    }
    expected = (
        {"Dispatcher", "IndexerFunction"}
        | ({"QueryFunction"} if overrides.get("QueryService") != "false" else set())
        | ({"EmbedFunction"} if overrides.get("EmbedLane") else set())
    )
    assert functions == expected
    assert all(
        metric["MetricStat"]["Metric"]["MetricName"] == "Throttles" for metric in throttles["Metrics"] if "MetricStat" in metric
    )
    for alarm in (age, throttles):
        assert alarm["AlarmActions"] == [{"Ref": "AlarmTopic"}]


def test_the_worker_runs_on_the_gpu_or_fails() -> None:
    container = stack()["Resources"]["WorkerJobDefinition"]["Properties"]["ContainerProperties"]
    assert {"Name": "DEVICE", "Value": "cuda"} in container["Environment"]
