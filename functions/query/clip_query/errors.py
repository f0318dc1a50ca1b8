"""The query API's refusals as domain errors: a stable code, a message, the field at fault and the
limit that was passed. Nothing here knows HTTP; api.py alone maps each code to a status.

Every caller-supplied value that goes into a message goes through `shown`, so an error never echoes
more than a short, printable excerpt, whatever the request held (a 5 MB `k`, a lone surrogate).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from clip_shared.events import DocumentError, ErrorCode
from clip_shared.mime import ACCEPTED_MIME_TYPES

#: The most characters of a caller's value an error repeats, and of a message or field name.
SHOWN_CHARS = 80
MESSAGE_CHARS = 500


class Code(StrEnum):
    INVALID_REQUEST = "invalid-request"
    INVALID_BASE64 = "invalid-base64"
    #: A multipart text part whose bytes do not decode in its charset (UTF-8 unless it names one).
    INVALID_TEXT = "invalid-text"
    TOO_MANY_ITEMS = "too-many-items"
    TOO_MANY_LABELS = "too-many-labels"
    OVER_LIMIT = "over-limit"
    TEXT_TOO_LONG = "text-too-long"
    TOO_MANY_PIXELS = "too-many-pixels"
    CORRUPT_IMAGE = "corrupt-image"
    #: Decoding the request's images went over the budget of one request (DECODE_CPU_SECONDS...).
    TOO_COSTLY = "too-costly"
    NOT_FOUND = "not-found"
    METHOD_NOT_ALLOWED = "method-not-allowed"
    BODY_TOO_LARGE = "body-too-large"
    REQUEST_TIMEOUT = "request-timeout"
    UNSUPPORTED_TYPE = "unsupported-type"
    UNSUPPORTED_MEDIA_TYPE = "unsupported-media-type"
    INTERNAL_ERROR = "internal-error"


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """`value` as an error may repeat it: at most `limit` characters, lone surrogates escaped (they
    cannot be encoded in a JSON answer), and huge integers described rather than converted."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        text = f"a {value.bit_length()}-bit number"
    else:
        text = value if isinstance(value, str) else repr(value)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


class QueryError(Exception):
    """A request the API refuses. `details` go into the error body as they are (`limit`, `unit`, `accepted`)."""

    def __init__(self, code: Code, message: str, field: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = shown(message, MESSAGE_CHARS)
        self.field = None if field is None else shown(field)
        self.details = details

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": str(self.code), "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return error | self.details


def invalid(message: str, field: str | None = None) -> QueryError:
    return QueryError(Code.INVALID_REQUEST, message, field)


def unsupported_type(field: str, found: str | None) -> QueryError:
    kind = f"a {found} file" if found else "not a recognisable file type"
    return QueryError(
        Code.UNSUPPORTED_TYPE,
        f"{shown(field)} is {kind}; send one of the accepted image types",
        field,
        accepted=sorted(ACCEPTED_MIME_TYPES),
    )


def image_error(field: str, error: DocumentError, max_pixels: int) -> QueryError:
    """The decoder's verdict on one image, under the API's codes."""
    if error.code is ErrorCode.TOO_MANY_PIXELS:
        return QueryError(Code.TOO_MANY_PIXELS, error.message, field, limit=max_pixels)
    if error.code is ErrorCode.UNSUPPORTED_TYPE:
        return unsupported_type(field, None)
    if error.code is ErrorCode.TOO_COSTLY:
        return QueryError(Code.TOO_COSTLY, error.message, field)
    return QueryError(Code.CORRUPT_IMAGE, error.message, field)
