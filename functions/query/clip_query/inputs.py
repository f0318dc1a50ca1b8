"""What a request sends: texts and images under the names the caller chose, and the endpoint's options.

Three request shapes carry the same content:
- JSON `{"text": "..."}` or `{"image": "<base64>"}`: one input (the SageMaker-backed API's shape);
- JSON `{"texts": [...] or {...}, "images": [...] or {...}}`: many, keyed `texts[0]`... or by the
  object's own keys;
- `multipart/form-data`: each part keyed by its field name (`name[0]`, `name[1]`... when a name
  repeats). A file part (one with a filename) is an image; a part without one is an image when its
  Content-Type is `image/*` or its bytes are an image's (`curl -F 'photo=<x.gif'` sends neither
  filename nor type), and otherwise a text, which must decode in its charset (UTF-8 unless the
  part or the form names another) or is refused as `invalid-text`.
Options are JSON members or form fields of the endpoint's own option names (models.py); another
endpoint's option is refused, not read as a text.

Whatever the body holds, reading it costs at most a bounded amount: the JSON parser's depth and
number sizes are capped, containers longer than the limits are refused before pydantic looks at
their items, and every refusal is a QueryError naming the field.
"""

from __future__ import annotations

import codecs
import io
import json
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from clip_query.config import QueryConfig
from clip_query.errors import Code, QueryError, invalid, shown
from clip_query.models import BASE64_ERROR, INPUT_FIELDS, ClassifyRequest, EmbedRequest, SearchParameters, SearchRequest, is_text
from clip_shared.mime import SNIFF_BYTES, sniff_mime

M = TypeVar("M", bound=BaseModel)

#: Every option name of every endpoint: in a form, such a field is never read as a text.
OPTIONS = frozenset().union(*(set(model.model_fields) - INPUT_FIELDS for model in (EmbedRequest, ClassifyRequest, SearchRequest)))
#: Python refuses to convert longer digit strings (sys.get_int_max_str_digits); such a JSON number
#: is read as an infinity, which the models refuse as a number out of range, naming its member.
MAX_INT_DIGITS = 4300


@dataclass
class Inputs(Generic[M]):
    #: The endpoint's request model: its options (inputs are taken out into `texts` and `images`).
    options: M
    texts: dict[str, str] = field(default_factory=dict)
    images: dict[str, bytes] = field(default_factory=dict)
    #: The request was `{"text": ...}` or `{"image": ...}`: the answer is the bare vector.
    single: bool = False

    @property
    def count(self) -> int:
        return len(self.texts) + len(self.images)


def field_name(location: tuple[int | str, ...]) -> str | None:
    """pydantic's error location as the API names fields: `k`, `texts[2]`, or a name the caller chose."""
    name: str | None = None
    for part in location:
        if part == "[key]":
            continue
        name = f"{name}[{part}]" if isinstance(part, int) else part
    return name


def validated(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        name = field_name(first["loc"])
        if first["type"] == "missing":
            raise invalid(f"{name} is missing", name) from None
        code = Code.INVALID_BASE64 if first["type"] == BASE64_ERROR else Code.INVALID_REQUEST
        # models.py's own messages read on from the name ("image is not valid base64"); pydantic's are sentences.
        message = first["msg"]
        if name is not None:
            message = f"{shown(name)}{' ' if message[:1].islower() else ': '}{message}"
        raise QueryError(code, message, name) from None


def check_counts(items: int, labels: int, config: QueryConfig) -> None:
    if items > config.max_items:
        raise QueryError(
            Code.TOO_MANY_ITEMS, f"{items} inputs is over the limit of {config.max_items} a request", limit=config.max_items
        )
    if labels > config.max_labels:
        raise QueryError(
            Code.TOO_MANY_LABELS, f"{labels} labels is over the limit of {config.max_labels}", "labels", limit=config.max_labels
        )


def check_k(k: int, config: QueryConfig) -> int:
    if k > config.max_results:
        raise QueryError(
            Code.OVER_LIMIT, f"k={shown(k)} is over the limit of {config.max_results}", "k", limit=config.max_results
        )
    return k


def _json_int(digits: str) -> int | float:
    return int(digits) if len(digits) <= MAX_INT_DIGITS else float(digits)


def parse_json(body: bytes) -> Any:
    if not body:
        raise invalid("the body is empty; send JSON or multipart/form-data")
    try:
        return json.loads(body, parse_int=_json_int)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise invalid("the body nests arrays or objects too deeply to be a request") from None


def _add(inputs: Inputs[Any], name: str, value: str | bytes) -> None:
    if name in inputs.texts or name in inputs.images:
        raise invalid(f"'{shown(name)}' names two inputs", name)
    if isinstance(value, str):
        inputs.texts[name] = value
    else:
        inputs.images[name] = value


def from_json(document: Any, model: type[M], config: QueryConfig) -> Inputs[M]:
    if not isinstance(document, dict):
        raise invalid("the body must be a JSON object")
    unknown = sorted(set(document) - set(model.model_fields))
    if unknown:
        raise invalid(f"unknown field '{shown(unknown[0])}'; expected {', '.join(model.model_fields)}", unknown[0])
    # Counted before pydantic looks at the items: it would report every one of a million wrong items.
    sizes = {name: len(value) if isinstance(value, (list, dict)) else 1 for name, value in document.items()}
    check_counts(sum(sizes.get(name, 0) for name in INPUT_FIELDS), sizes.get("labels", 0), config)
    # pydantic reports a bad key with the key mangled; the caller's own names come back escaped instead.
    for name in (key for many in ("texts", "images") if isinstance(document.get(many), dict) for key in document[many]):
        if not is_text(name):
            raise invalid(f"'{shown(name)}' holds a lone surrogate, which is not text", name)
    inputs = Inputs(options=validated(model, document))
    for single in ("text", "image"):
        if (value := getattr(inputs.options, single, None)) is not None:
            _add(inputs, single, value)
    for many in ("texts", "images"):
        for name, value in (getattr(inputs.options, many, None) or {}).items():
            _add(inputs, name, value)
    inputs.single = inputs.count == 1 and not document.keys() & {"texts", "images"}
    return inputs


class _PartParser(MultiPartParser):
    """Starlette's multipart parser, keeping every part's bytes and headers: Starlette turns a part
    without a filename into a string, as Latin-1 where its charset fails, which loses both what the
    part is (an image sent as a plain field) and whether it was text at all."""

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is not None:
            super().on_part_end()
            return
        self.items.append((part.field_name, UploadFile(io.BytesIO(bytes(part.data)), headers=Headers(raw=part.item_headers))))


async def _parse_form(request: Request, max_parts: int, max_fields: int, max_part_bytes: int) -> FormData:
    try:
        async with aclosing(request.stream()) as stream:
            parser = _PartParser(
                request.headers, stream, max_files=max_parts, max_fields=max_fields, max_part_size=max_part_bytes
            )
            return await parser.parse()
    except (MultiPartException, HTTPException) as exc:
        message = str(getattr(exc, "detail", None) or getattr(exc, "message", exc))
        if "Too many" in message:
            raise QueryError(Code.TOO_MANY_ITEMS, f"{message} (at most {max_parts} inputs a request)", limit=max_parts) from None
        raise invalid(f"the multipart body cannot be read: {shown(message)}") from None


def _charset(content_type: str | None) -> str | None:
    for parameter in (content_type or "").split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"') or None
    return None


def _text(name: str, data: bytes, charset: str) -> str:
    try:
        text = data.decode(codecs.lookup(charset).name)
    except LookupError:
        raise QueryError(Code.INVALID_TEXT, f"{shown(name)} names charset {shown(charset)}, which is not one", name) from None
    except UnicodeDecodeError as exc:
        raise QueryError(
            Code.INVALID_TEXT,
            f"{shown(name)} is not {shown(charset)} text (byte {exc.start} of {len(data)}); send text in UTF-8, "
            "an image as a file or with its image/* Content-Type",
            name,
        ) from None
    if not is_text(text):  # a codec (unicode_escape) that makes lone surrogates
        raise invalid(f"'{shown(name)}' holds a lone surrogate, which is not text", name)
    return text


def _is_image(part: UploadFile, data: bytes) -> bool:
    if part.filename is not None or (part.content_type or "").lower().startswith("image/"):
        return True
    sniffed = sniff_mime(data[:SNIFF_BYTES])
    return sniffed is not None and sniffed.startswith("image/")


async def from_form(request: Request, model: type[M], config: QueryConfig) -> Inputs[M]:
    options = set(model.model_fields) - INPUT_FIELDS
    # An image sent as a plain field is a part as large as a file may be: the body limit bounds both.
    form = await _parse_form(request, config.max_items, config.max_items + len(options), config.max_body_bytes)
    form_charset = _charset(request.headers.get("content-type")) or "utf-8"
    try:
        counts: dict[str, int] = {}
        for name, _ in form.multi_items():
            counts[name] = counts.get(name, 0) + 1
        seen: dict[str, int] = {}
        values: dict[str, str] = {}
        parts: list[tuple[str, str | bytes]] = []
        for name, part in form.multi_items():
            if not is_text(name):
                raise invalid(f"'{shown(name)}' holds a lone surrogate, which is not text", name)
            assert isinstance(part, UploadFile)  # _PartParser makes every part one
            data = await part.read()
            charset = _charset(part.headers.get("content-type")) or form_charset
            if name in OPTIONS:
                if name not in options:
                    raise invalid(f"{shown(name)} is not an option here; expected {', '.join(sorted(options))}", name)
                values[name] = _text(name, data, charset)
                continue
            position = seen.get(name, 0)
            seen[name] = position + 1
            key = f"{name}[{position}]" if counts[name] > 1 else name
            parts.append((key, data if _is_image(part, data) else _text(key, data, charset)))
    finally:
        await form.close()
    inputs = Inputs(options=validated(model, values))
    for key, value in parts:
        _add(inputs, key, value)
    return inputs


async def read(request: Request, model: type[M], config: QueryConfig) -> Inputs[M]:
    """The request's inputs and options, whatever its shape; QueryError when it is malformed or over a limit."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        inputs = await from_form(request, model, config)
    elif content_type in ("application/json", ""):
        inputs = from_json(parse_json(await request.body()), model, config)
    else:
        raise QueryError(
            Code.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Type {shown(content_type)} is not accepted; send application/json or multipart/form-data",
        )
    check_counts(inputs.count, len(getattr(inputs.options, "labels", None) or ()), config)
    return inputs


def search_parameters(request: Request, config: QueryConfig) -> SearchParameters:
    """GET /search's query string."""
    if not request.query_params.get("q", "").strip():
        raise invalid("q is missing: GET /search?q=a+red+bicycle&k=10", "q")
    parameters = validated(SearchParameters, dict(request.query_params))
    check_k(parameters.k, config)
    return parameters
