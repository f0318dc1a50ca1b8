"""How the pipeline talks to AWS: the client retry settings, and what S3's answers mean.

One owner for the error codes every caller sorts S3's answers by: an object that is not there, a
conditional write that lost a race, and failures that say "not now" rather than "never".
"""

from __future__ import annotations

from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

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
