"""What the API takes and gives, as pydantic models: the same classes validate every request and
generate /openapi.json, so the schema clients and fuzzers read is the parser the API runs.

Requests carry inputs (`text`, `image`, `texts`, `images`) and each endpoint's own options. A member
that is present must hold a value (`null` is refused, not read as absent), and every string must be
text (a lone surrogate, which no UTF-8 answer could repeat, is refused with the field that holds it).
Limits that come from the configuration (items, labels, `k`) are checked by inputs.py, not here.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

#: The pydantic error type of an image that is not base64; inputs.py answers it as `invalid-base64`.
BASE64_ERROR = "base64"


def is_text(value: str) -> bool:
    """False for a string with a lone surrogate (JSON's "\\ud800", or a form in a codec that makes them)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(value: str) -> str:
    if not is_text(value):
        raise PydanticCustomError("unicode", "holds a lone surrogate, which is not text")
    return value


def _image(value: Any) -> bytes:
    if not isinstance(value, str):
        raise PydanticCustomError("image_type", "must be a base64 string")
    # Browsers hand out data URLs (data:image/png;base64,...); the payload is what follows the comma.
    if value.startswith("data:"):
        header, comma, value = value.partition(",")
        if not comma:
            raise PydanticCustomError(BASE64_ERROR, "is a data: URL with no comma, so no data")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise PydanticCustomError(BASE64_ERROR, "is not valid base64") from None


def _keyed(value: Any, info: ValidationInfo) -> Any:
    """A list becomes {"texts[0]": ..., "texts[1]": ...}: every input is named, as the answer keys it."""
    if isinstance(value, list):
        return {f"{info.field_name}[{position}]": item for position, item in enumerate(value)}
    if not isinstance(value, dict):
        raise PydanticCustomError("named", "must be a list, or an object of name -> value")
    return value


def _flag(value: Any) -> Any:
    # An empty form field (a checkbox left unticked by a script) means false, as pydantic would not say.
    return False if isinstance(value, str) and not value.strip() else value


def _count(value: Any) -> Any:
    if isinstance(value, bool):
        raise PydanticCustomError("whole_number", "must be a whole number, not true or false")
    return value


def _split_labels(value: Any) -> Any:
    return value.split(",") if isinstance(value, str) else value


def _clean_labels(labels: list[str]) -> list[str]:
    kept = list(dict.fromkeys(label.strip() for label in labels if label.strip()))
    if not kept:
        raise PydanticCustomError("empty", "is empty; leave it out to use the default label set")
    return kept


Text = Annotated[str, AfterValidator(_text)]
Base64Image = Annotated[
    bytes,
    BeforeValidator(_image, json_schema_input_type=str),
    Field(description="the image file's bytes in base64, plain or as a data: URL"),
]
NamedTexts = Annotated[dict[Text, Text], BeforeValidator(_keyed, json_schema_input_type=list[Text] | dict[Text, Text])]
NamedImages = Annotated[
    dict[Text, Base64Image], BeforeValidator(_keyed, json_schema_input_type=list[Base64Image] | dict[Text, Base64Image])
]
Flag = Annotated[bool, BeforeValidator(_flag)]
Count = Annotated[int, BeforeValidator(_count), Field(ge=1)]
Labels = Annotated[
    list[Text],
    BeforeValidator(_split_labels, json_schema_input_type=list[Text] | str),
    AfterValidator(_clean_labels),
    Field(description="the labels to rank: a list, or one comma-separated string"),
]


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _present(cls, value: Any) -> Any:
        if value is None:
            raise PydanticCustomError("null", "must not be null; leave the member out instead")
        return value


class TextInputs(RequestModel):
    text: Text | None = Field(None, description="one text; alone in the body, the answer is its bare vector")
    texts: NamedTexts | None = Field(None, description="texts, keyed in the answer by position (`texts[0]`) or by name")


class ImageInputs(RequestModel):
    image: Base64Image | None = Field(None, description="one image; alone in the body, the answer is its bare vector")
    images: NamedImages | None = Field(None, description="images, keyed in the answer by position (`images[0]`) or by name")


class EmbedRequest(TextInputs, ImageInputs):
    truncate: Flag = Field(False, description="embed only the beginning of a text longer than the model's context")


class ClassifyRequest(ImageInputs):
    labels: Labels | None = None
    top_k: Count | None = Field(None, description="labels returned per image (KEYWORDS_TOP_K when left out)")


class SearchRequest(EmbedRequest):
    k: Count = Field(10, description="results to return")


class SearchParameters(BaseModel):
    """GET /search's query string; other parameters (cache busters) are ignored."""

    q: Text = Field(description="the text to search the stored images for")
    k: Count = Field(10, description="results to return")
    truncate: Flag = Field(False, description="embed only the beginning of a text longer than the model's context")


#: The members of each request model that are inputs; the rest are options.
INPUT_FIELDS = frozenset({"text", "texts", "image", "images"})


class RequestSchema(GenerateJsonSchema):
    """Request members are optional but never null: the schema says so (pydantic would add `null`)."""

    def nullable_schema(self, schema: core_schema.NullableSchema) -> JsonSchemaValue:
        return self.generate_inner(schema["schema"])

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        generated = super().default_schema(schema)
        if generated.get("default", False) is None:
            del generated["default"]
        return generated


def request_schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema(schema_generator=RequestSchema)


# ---------------------------------------------------------------------------------------------
# answers


class Described(BaseModel):
    request_id: str
    model: str
    pretrained: str
    dimensions: int


class SearchInUse(BaseModel):
    """How /search searches now, and the recall measured with it on the store's own vectors (clip_store.recall)."""

    nprobes: int = Field(description="IVF partitions probed a query")
    refine_factor: int = Field(description="x k candidates re-ranked with their full vectors")
    recall: dict[str, float] = Field(
        default_factory=dict, description="recall@k measured at the measured settings, by probe kind: images, texts"
    )
    k: int | None = None
    target: float | None = None
    reached: bool | None = Field(None, description="whether every kind reached the target (None: not measured yet)")
    measured_rows: int | None = None
    measured_at: str | None = None


class Health(Described):
    status: Literal["ok"]
    indexed: int = Field(description="vectors in the store")
    search: SearchInUse | None = Field(None, description="null while the store holds nothing")


class EmbedAnswer(Described):
    vectors: dict[str, list[float]] = Field(description="unit vectors, keyed by the inputs' names")


class Similarity(BaseModel):
    cosine: float
    score: float = Field(description="100 x max(cosine, 0), as CLIP demos show it")


class SimilarityAnswer(Described):
    similarity: dict[str, dict[str, Similarity]] = Field(description="text name -> image name -> similarity")


class LabelScore(BaseModel):
    label: str
    score: float = Field(description="cosine between the image and the label's prompt")
    probability: float = Field(description="softmax of the model's temperature x the cosines, over the labels compared")


class ClassifyAnswer(Described):
    prompt: str
    label_set: str = Field(description="`request`, or the configured set (CLIP_LABELS)")
    labels_compared: int
    images: dict[str, list[LabelScore]] = Field(description="image name -> its best labels, best first")


class SearchResult(BaseModel):
    rank: int
    url: str
    score: float
    preview: str | None = Field(description="a presigned GET URL of the stored image")


class SearchAnswer(Described):
    query: dict[Literal["text", "image"], str] = Field(description="the text searched for, or the image's name")
    indexed: int = Field(description="stored vectors ranked")
    results: list[SearchResult]


class ErrorDetail(BaseModel):
    code: str = Field(description="stable: invalid-request, too-many-items, too-many-pixels, ... (docs/query-api.md)")
    message: str
    field: str | None = Field(None, description="the input or option at fault")
    limit: int | None = Field(None, description="the limit that was passed")
    unit: Literal["tokens", "characters"] | None = Field(None, description="what a text limit counts")
    accepted: list[str] | None = Field(None, description="the image types the API embeds (unsupported-type)")


class ErrorAnswer(BaseModel):
    request_id: str
    error: ErrorDetail
