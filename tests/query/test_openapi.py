"""The API against its own /openapi.json: schemathesis generates requests from the schema (valid ones
and deliberately broken ones, JSON and multipart) and sends them to the application in-process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

from clip_query.api import create_app
from clip_query.config import QueryConfig
from clip_worker.model import ClipModel
from tests.query.conftest import Stored

#: Generated requests per operation and mode (valid, or deliberately broken); enough to reach every
#: member and both body shapes, few enough for the suite (about a minute on 2 cores, tiny model).
EXAMPLES = 100


@pytest.fixture(scope="module")
def app(stored: Stored, query_config: QueryConfig, model: ClipModel) -> Iterator[FastAPI]:
    yield create_app(query_config, stored.service(query_config, model))


@pytest.fixture(scope="module")
def api_schema(app: FastAPI) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_asgi("/openapi.json", app)


OPERATIONS = [
    ("GET", "/health"),
    ("POST", "/embed"),
    ("POST", "/similarity"),
    ("POST", "/classify"),
    ("GET", "/search"),
    ("POST", "/search"),
]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


# schemathesis's documented strategies with Hypothesis's @given, rather than its pytest plugin, which
# does not run under pytest 9.2 (it renames test items through an attribute pytest removed).
@pytest.mark.parametrize(
    ("method", "path", "mode"),
    [
        (method, path, mode)
        for method, path in OPERATIONS
        for mode in GenerationMode
        # /health takes nothing a request could break.
        if path != "/health" or mode is GenerationMode.POSITIVE
    ],
)
def test_no_generated_request_gets_a_server_error_or_an_answer_the_schema_does_not_describe(
    api_schema: schemathesis.BaseSchema, method: str, path: str, mode: GenerationMode
) -> None:
    @given(case=api_schema[path][method].as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def call(case: schemathesis.Case) -> None:
        case.call_and_validate(checks=CHECKS)

    call()


def test_the_schema_declares_every_body_parameter_and_refusal(app: FastAPI) -> None:
    spec = app.openapi()
    operations = {(method.upper(), path): operation for path, item in spec["paths"].items() for method, operation in item.items()}
    assert sorted(operations) == sorted(OPERATIONS)  # so the generated requests reach every operation
    for key, operation in operations.items():
        if key[0] == "POST":
            assert set(operation["requestBody"]["content"]) == {"application/json", "multipart/form-data"}, key
            assert {"200", "400", "413", "415"} <= set(operation["responses"]), key
            assert operation["requestBody"]["content"]["application/json"]["schema"]["additionalProperties"] is False
    assert [parameter["name"] for parameter in operations["GET", "/search"]["parameters"]] == ["q", "k", "truncate"]
    embed = operations["POST", "/embed"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert set(embed) == {"text", "texts", "image", "images", "truncate"}
    classify = operations["POST", "/classify"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert set(classify) == {"image", "images", "labels", "top_k"}
    error = spec["components"]["schemas"]["ErrorDetail"]["properties"]
    assert {"code", "message", "field", "limit"} <= set(error)
    assert "422" not in str(spec["paths"])  # refusals are the API's own JSON, never FastAPI's validation shape
