"""What S3's refusals mean: which are the object's own state (an outcome), which are not about it."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from clip_shared import aws
from clip_shared.events import ErrorCode


def answered(code: str, message: str, status: int = 403) -> ClientError:
    response = {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "GetObject")


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (answered("InvalidObjectState", "The operation is not valid for the object's storage class"), ErrorCode.OBJECT_ARCHIVED),
        (
            answered(
                "InvalidRequest",
                "The object was stored using a form of Server Side Encryption. The correct parameters must be provided to retrieve the object.",
                400,
            ),
            ErrorCode.CUSTOMER_KEY_REQUIRED,
        ),
        (answered("KMS.DisabledException", "arn:aws:kms:us-east-1:1:key/k is disabled.", 400), ErrorCode.KMS_KEY_UNUSABLE),
        (answered("KMS.KMSInvalidStateException", "key/k is pending deletion.", 400), ErrorCode.KMS_KEY_UNUSABLE),
        (answered("KMS.NotFoundException", "Invalid keyId", 400), ErrorCode.KMS_KEY_UNUSABLE),
        (
            answered("AccessDenied", "User: r is not authorized to perform: kms:Decrypt on resource: key/k"),
            ErrorCode.KMS_KEY_UNUSABLE,
        ),
        (answered("AccessDenied", "Access Denied"), ErrorCode.ACCESS_DENIED),
    ],
)
def test_what_s3_will_never_serve_has_a_code_of_its_own(error: ClientError, code: ErrorCode) -> None:
    refused = aws.refusal(error)
    assert refused is not None and refused[0] == code
    assert error.response["Error"]["Code"] in refused[1]  # S3's own words stay in the record
    assert not aws.is_transient(error)


@pytest.mark.parametrize(
    "error",
    [
        answered("KMS.ThrottlingException", "Rate exceeded", 400),
        answered("SlowDown", "Please reduce your request rate.", 503),
        answered("ExpiredToken", "The provided token has expired.", 400),
        answered("InvalidRequest", "Missing required header for this request: x-amz-content-sha256", 400),
        answered("NoSuchKey", "The specified key does not exist.", 404),
        ConnectionError("reset"),
    ],
)
def test_answers_about_the_caller_or_the_moment_give_the_object_no_outcome(error: Exception) -> None:
    assert aws.refusal(error) is None
