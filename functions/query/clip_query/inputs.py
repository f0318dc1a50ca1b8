"""What a request sends: texts and images under the names the caller chose, and options.

Three request shapes carry the same content:
- JSON `{"text": "..."}` or `{"image": "<base64>"}`: one input (the SageMaker-backed API's shape);
- JSON `{"texts": [...] or {...}, "images": [...] or {...}}`: many, keyed `texts[0]`... or by the
  object's own keys;
- `multipart/form-data`: file parts are images, other parts are texts, each keyed by its field
  name (`name[0]`, `name[1]`... when a name repeats).
Options (`truncate`, `labels`, `top_k`, `k`) are JSON members or form fields of those names.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from clip_shared.mime import ACCEPTED_MIME_TYPES

#: Form fields and JSON members that are options, never inputs.
OPTIONS = ("truncate", "labels", "top_k", "k")


class ApiError(Exception):
    """A request the API refuses: a 4xx status and a JSON body that names the field and the limit."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.details = details

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return error | self.details


def invalid(message: str, field: str | None = None) -> ApiError:
    return ApiError(400, "invalid-request", message, field)


def unsupported_type(field: str, found: str | None) -> ApiError:
    kind = f"a {found} file" if found else "not a recognisable file type"
    return ApiError(
        415,
        "unsupported-type",
        f"{field} is {kind}; send one of the accepted image types",
        field,
        accepted=sorted(ACCEPTED_MIME_TYPES),
    )


@dataclass
class Inputs:
    texts: dict[str, str] = field(default_factory=dict)
    images: dict[str, bytes] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    #: The request was `{"text": ...}` or `{"image": ...}`: the answer is the bare vector.
    single: bool = False

    @property
    def count(self) -> int:
        return len(self.texts) + len(self.images)

    def flag(self, name: str) -> bool:
        value = self.options.get(name, False)
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no", ""):
            return value.strip().lower() in ("true", "1", "yes")
        raise invalid(f"{name} must be true or false, not {value!r}", name)

    def integer(self, name: str, default: int, limit: int) -> int:
        value = self.options.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise invalid(f"{name} must be a whole number, not {value!r}", name)
        try:
            number = int(value)
        except ValueError:
            raise invalid(f"{name} must be a whole number, not {value!r}", name) from None
        if number < 1:
            raise invalid(f"{name} must be at least 1", name)
        if number > limit:
            raise ApiError(400, "over-limit", f"{name}={number} is over the limit of {limit}", name, limit=limit)
        return number

    def labels(self, limit: int) -> list[str] | None:
        """The request's own label set: a JSON list, or a form field of comma-separated labels."""
        value = self.options.get("labels")
        if value is None:
            return None
        if isinstance(value, str):
            value = value.split(",")
        if not isinstance(value, list) or not all(isinstance(label, str) for label in value):
            raise invalid("labels must be a list of strings (or, in a form, one comma-separated field)", "labels")
        labels = list(dict.fromkeys(label.strip() for label in value if label.strip()))
        if not labels:
            raise invalid("labels is empty; leave it out to use the default label set", "labels")
        if len(labels) > limit:
            raise ApiError(400, "too-many-labels", f"{len(labels)} labels is over the limit of {limit}", "labels", limit=limit)
        return labels


def decode_base64(value: Any, field: str) -> bytes:
    if not isinstance(value, str):
        raise invalid(f"{field} must be a base64 string", field)
    # Browsers hand out data URLs (data:image/png;base64,...); the payload is what follows the comma.
    payload = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid-base64", f"{field} is not valid base64", field) from None


def _named(value: Any, field: str) -> list[tuple[str, Any]]:
    if isinstance(value, list):
        return [(f"{field}[{position}]", item) for position, item in enumerate(value)]
    if isinstance(value, dict):
        return list(value.items())
    raise invalid(f"{field} must be a list, or an object of name -> value", field)


def from_json(document: Any) -> Inputs:
    if not isinstance(document, dict):
        raise invalid("the body must be a JSON object")
    inputs = Inputs(options={name: document[name] for name in OPTIONS if name in document})
    unknown = sorted(set(document) - {"text", "image", "texts", "images", *OPTIONS})
    if unknown:
        raise invalid(f"unknown field {unknown[0]!r}; expected text, image, texts, images or {', '.join(OPTIONS)}", unknown[0])
    if "text" in document:
        inputs.texts["text"] = document["text"]
    if "image" in document:
        inputs.images["image"] = decode_base64(document["image"], "image")
    for name, text in _named(document.get("texts", []), "texts"):
        inputs.texts[name] = text
    for name, value in _named(document.get("images", []), "images"):
        if name in inputs.texts:
            raise invalid(f"{name!r} names both a text and an image", name)
        inputs.images[name] = decode_base64(value, name)
    for name, text in inputs.texts.items():
        if not isinstance(text, str):
            raise invalid(f"{name} must be a string", name)
    inputs.single = inputs.count == 1 and set(document) - set(OPTIONS) <= {"text", "image"}
    return inputs


async def from_form(request: Request, max_items: int) -> Inputs:
    try:
        form = await request.form(max_files=max_items, max_fields=max_items + len(OPTIONS))
    except (MultiPartException, HTTPException) as exc:
        # Starlette reports its part limits as an HTTP 400 whose detail is the parser's message.
        message = getattr(exc, "detail", None) or getattr(exc, "message", str(exc))
        if "Too many" in message:
            raise ApiError(400, "too-many-items", f"{message} (at most {max_items} inputs a request)", limit=max_items) from None
        raise invalid(f"the multipart body cannot be read: {message}") from None
    counts: dict[str, int] = {}
    for name, _ in form.multi_items():
        counts[name] = counts.get(name, 0) + 1
    seen: dict[str, int] = {}
    inputs = Inputs()
    for name, value in form.multi_items():
        if name in OPTIONS:
            inputs.options[name] = value if isinstance(value, str) else (await value.read()).decode(errors="replace")
            continue
        position = seen.get(name, 0)
        seen[name] = position + 1
        key = f"{name}[{position}]" if counts[name] > 1 else name
        if isinstance(value, UploadFile):
            inputs.images[key] = await value.read()
        else:
            inputs.texts[key] = value
    await form.close()
    return inputs


async def read(request: Request, max_items: int) -> Inputs:
    """The request's inputs, whatever its shape; ApiError when it is malformed or over `max_items`."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        inputs = await from_form(request, max_items)
    elif content_type in ("application/json", ""):
        body = await request.body()
        if not body:
            raise invalid("the body is empty; send JSON or multipart/form-data")
        try:
            document = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise invalid(f"the body is not valid JSON: {exc}") from None
        inputs = from_json(document)
    else:
        raise ApiError(
            415, "unsupported-media-type", f"Content-Type {content_type} is not accepted; send application/json or multipart/form-data"
        )
    if inputs.count > max_items:
        raise ApiError(400, "too-many-items", f"{inputs.count} inputs is over the limit of {max_items} a request", limit=max_items)
    return inputs
