"""How the pipeline talks to AWS: the client retry settings, and what S3's answers mean.

One owner for the error codes every caller sorts S3's answers by: an object that is not there, an
object S3 holds but will not serve, a conditional write that lost a race, and failures that say
"not now" rather than "never".
"""

from __future__ import annotations

from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from clip_shared.events import ErrorCode

#: Standard mode retries throttling (SubmitJob's TooManyRequestsException included), 5xx and
#: connection errors with exponential backoff and jitter; 8 attempts ride out about a minute.
CLIENT_CONFIG = Config(retries={"mode": "standard", "total_max_attempts": 8})

_MISSING = frozenset({"404", "NoSuchKey", "NoSuchVersion", "NotFound"})
_LOST_RACE = frozenset({"412", "PreconditionFailed", "ConditionalRequestConflict"})
_TRANSIENT = frozenset(
    {
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        # S3 passes on what KMS answered while decrypting an SSE-KMS object.
        "KMS.ThrottlingException",
        "KMS.KMSInternalException",
        "500",
        "502",
        "503",
        "504",
    }
)


def error_code(exc: BaseException) -> str:
    """The error code of an AWS client error, "" for anything else."""
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def is_missing(exc: BaseException) -> bool:
    """The object (or that version of it) does not exist."""
    return error_code(exc) in _MISSING


def lost_race(exc: BaseException) -> bool:
    """A conditional request (If-None-Match, If-Match) found the object not as it expected."""
    return error_code(exc) in _LOST_RACE


def is_transient(exc: BaseException) -> bool:
    """Throttling, AWS's own 5xx, and network failures (BotoCoreError covers connections, timeouts, cut streams)."""
    if isinstance(exc, ClientError):
        return error_code(exc) in _TRANSIENT
    return isinstance(exc, (BotoCoreError, ConnectionError, TimeoutError))


def refusal(exc: BaseException) -> tuple[ErrorCode, str] | None:
    """Why S3 will not serve an object it holds, and what its owner can do, or None when the error
    is not about the object (an expired token, throttling, a network failure): asking again with
    the same request can only get the same answer, so the object gets an outcome instead."""
    code = error_code(exc)
    if not code:
        return None
    said = str(exc.response.get("Error", {}).get("Message", "")) if isinstance(exc, ClientError) else ""
    answer = f"S3 answered {code}" + (f": {said}" if said else "")
    if code == "InvalidObjectState":
        return ErrorCode.OBJECT_ARCHIVED, f"{answer} (an archive storage class: restore it, then run backfill)"
    if code == "InvalidRequest" and "encryption" in said.lower():
        # SSE-C: only the uploader holds the key, and S3 wants it on every GET.
        return ErrorCode.CUSTOMER_KEY_REQUIRED, f"{answer} (encrypted with a customer-provided key the pipeline does not have)"
    if (code.startswith("KMS.") and code not in _TRANSIENT) or (code == "AccessDenied" and "kms" in said.lower()):
        return ErrorCode.KMS_KEY_UNUSABLE, f"{answer} (encrypted with a KMS key this role cannot use: grant kms:Decrypt)"
    if code == "AccessDenied":
        return ErrorCode.ACCESS_DENIED, f"{answer} (a bucket or object policy, or the object's owner, keeps it from this role)"
    return None
