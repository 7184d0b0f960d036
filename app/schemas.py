"""Request and response models. Limits come from Settings, so request models are built per app by
`text_search_request(settings)`; the OpenAPI schema at /docs shows the limits actually enforced."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat,
                      StrictInt, StringConstraints, create_model)

from clipsearch.artifacts import COLLECTION_NAME

from app.cache import WHITESPACE, normalize_query
from app.config import Settings

MAX_FILTER_FIELDS = 16
MAX_FILTER_VALUES = 100

CollectionName = Annotated[str, StringConstraints(pattern=COLLECTION_NAME.pattern)]
FilterScalar = Annotated[str, StringConstraints(max_length=256)] | StrictInt | StrictBool | \
    Annotated[StrictFloat, Field(allow_inf_nan=False)]
FilterValue = FilterScalar | Annotated[list[FilterScalar], Field(min_length=1, max_length=MAX_FILTER_VALUES)]
MetadataFilter = Annotated[
    dict[Annotated[str, StringConstraints(min_length=1, max_length=64)], FilterValue],
    Field(max_length=MAX_FILTER_FIELDS, description="Metadata filter: every field must equal the value, or "
                                                    "one of the values of a list, e.g. {\"split\": \"test\"} "
                                                    "or {\"folder\": [\"2019\", \"2020\"]}",
          examples=[{"split": "test"}])]
Target = Literal["images", "captions"]


class ImageHit(BaseModel):
    image_id: str
    score: float = Field(description="Cosine similarity between the query and the image")
    rank: int = Field(ge=1, description="1-based rank across pages (offset + position)")
    image_url: str = Field(description="Path of GET /images/{image_id}")
    thumbnail_url: str = Field(description="Path of GET /thumbnails/{image_id} (a small JPEG)")
    captions: list[str] = Field(description="The image's captions, if it has any")
    metadata: dict[str, Any] = Field(description="The item's metadata (folder, file time, split, ...)")


class CaptionHit(BaseModel):
    caption_id: str
    caption: str
    image_id: str
    score: float = Field(description="Ranking score: the cosine similarity plus the caption's hubness "
                                     "offset (-beta x how much of a hub the caption is) when the collection has one (GET /collections, `hubness`)")
    cosine: float = Field(description="Cosine similarity between the query image and the caption")
    rank: int = Field(ge=1)
    image_url: str
    thumbnail_url: str


class TextSearchResponse(BaseModel):
    results: list[ImageHit]
    k: int
    offset: int = Field(description="How many results were skipped (pagination)")
    collection: str
    took_ms: float = Field(description="Server time for this request in milliseconds")
    cached: bool = Field(description="Answered from the response cache")


class ImageSearchResponse(BaseModel):
    results: list[ImageHit] | list[CaptionHit] = Field(
        description="Similar images (target=images) or matching captions (target=captions)")
    target: Target
    k: int
    offset: int
    collection: str
    took_ms: float
    cached: bool


class CollectionInfo(BaseModel):
    name: str
    default: bool
    images: int
    captions: int
    model: dict[str, Any]
    index: dict[str, str] = Field(description="Search kind per target: exact (small) or hnsw")
    version: str
    hubness: dict[str, Any] | None = None
    metadata_fields: dict[str, list[Any]] = Field(
        description="Metadata fields with few distinct values, and those values (filter choices)")


class CollectionsResponse(BaseModel):
    default: str
    collections: list[CollectionInfo]
    skipped: dict[str, str] = Field(default_factory=dict, description="Collections not served, and why")


class ItemResponse(BaseModel):
    image_id: str
    collection: str
    image_url: str
    thumbnail_url: str
    captions: list[str]
    metadata: dict[str, Any]


class ErrorDetail(BaseModel):
    loc: list[str]
    msg: str
    type: str


class ErrorInfo(BaseModel):
    code: str = Field(examples=["invalid_request"])
    message: str
    details: list[ErrorDetail] | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class HealthResponse(BaseModel):
    status: str = "ok"


class ReadyResponse(BaseModel):
    ready: bool
    reason: str | None = None
    reloading: bool | None = Field(None, description="A reload (SIGHUP or POST /admin/reload) is running")
    reload_error: str | None = Field(None, description="Why the last reload failed; the resources "
                                                       "loaded before it are still being served")
    model: dict[str, Any] | None = None
    index_version: str | None = None
    default_collection: str | None = None
    collections: dict[str, dict[str, int]] | None = Field(
        None, description="Images and captions of each served collection")
    images: int | None = Field(None, description="Images across the served collections")
    captions: int | None = None
    hubness: dict[str, Any] | None = Field(None, description="The image→caption hubness correction of the "
                                                             "default collection (beta, k, query bank), if any")


class ReloadResponse(BaseModel):
    started: bool = Field(description="False when a load was already running (it is not restarted)")
    index_version: str | None = Field(description="The index version served now, before the reload")


def _normalized_query(text: str) -> str:
    query = normalize_query(text)
    if not query:
        raise ValueError("query is empty or only whitespace")
    return query


def _whole_number(value: Any) -> Any:
    # JSON Schema's "integer" includes 5.0, so clients and generators may send it; strings, booleans
    # and fractional numbers stay errors (k is strict otherwise).
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _common_fields(settings: Settings) -> dict[str, Any]:
    """k, collection, offset, min_score and filter: what every search request takes."""
    whole = Annotated[int, BeforeValidator(_whole_number)]
    return {
        "k": (whole, Field(settings.default_k, ge=1, le=settings.max_k, strict=True,
                           description=f"How many results (1..{settings.max_k})")),
        "collection": (CollectionName | None, Field(None, description="Collection to search (default: "
                                                                      "the service's default collection)")),
        "offset": (whole, Field(0, ge=0, le=settings.max_offset, strict=True,
                                description=f"Results to skip, for the next page (0..{settings.max_offset})")),
        # strict: a number (an integer is one), never a boolean or a numeric string
        "min_score": (Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-2, le=2)] | None,
                      Field(None, description="Leave out results scoring below this (-2..2)")),
        "filter": (MetadataFilter | None, None),
    }


def similar_request(settings: Settings) -> type[BaseModel]:
    """The POST /search/similar body model: more like an image already in the collection."""
    return create_model(
        "SimilarSearchRequest",
        __config__=ConfigDict(extra="forbid", json_schema_extra={"examples": [
            {"image_id": "1000268201_693b08cb0e.jpg", "k": settings.default_k}]}),
        image_id=(Annotated[str, StringConstraints(min_length=1, max_length=1024)],
                  Field(description="An item of the collection (the query image itself is left out)")),
        **_common_fields(settings),
    )


def text_search_request(settings: Settings) -> type[BaseModel]:
    """The POST /search/text body model with this app's limits; `query` arrives normalised
    (NFC, whitespace runs collapsed), which is also the form that is encoded and cached."""
    # The length limit counts the characters as sent (what the schema's maxLength says); the
    # pattern tells schema readers what the validator enforces: at least one non-whitespace character.
    query = Annotated[str, StringConstraints(min_length=1, max_length=settings.max_query_chars),
                      AfterValidator(_normalized_query)]
    return create_model(
        "TextSearchRequest",
        __config__=ConfigDict(extra="forbid", json_schema_extra={"examples": [
            {"query": "a dog running on the beach", "k": settings.default_k}]}),
        query=(query, Field(description=f"Search text, 1..{settings.max_query_chars} characters, not "
                                        f"only whitespace; trimmed, whitespace runs collapsed, NFC",
                            json_schema_extra={"pattern": f"[^{WHITESPACE}]"})),
        **_common_fields(settings),
    )


# -- live writes (app/routes/writes.py) ----------------------------------------------------------

class WriteItemResponse(ItemResponse):
    created: bool = Field(description="True when this request added the item (201); false when it was "
                                      "already there (200), with captions or metadata updated if they differed")
    version: str = Field(description="The collection's version after the write (part of every cache key)")


class CaptionsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    captions: list[Annotated[str, StringConstraints(min_length=1, max_length=1000)]] = Field(
        max_length=1000, description="The item's new captions (replacing all it had); [] removes them")


class CompactResponse(BaseModel):
    compacted: bool
    collection: str
    seconds: float | None = None
    images: int | None = None
    captions: int | None = None
    reason: str | None = None
