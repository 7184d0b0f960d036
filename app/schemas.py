"""Request and response models. Limits come from Settings, so request models are built per app by
`text_search_request(settings)`; the OpenAPI schema at /docs shows the limits actually enforced."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat,
                      StrictInt, StringConstraints, create_model, model_validator)

from clipsearch.artifacts import COLLECTION_NAME
from clipsearch.models import is_local_checkpoint

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


def _public_model(model: dict[str, Any]) -> dict[str, Any]:
    """A model identity fit for a client: a local checkpoint named by its file, never by where this
    server keeps it (the sha256 still identifies it)."""
    pretrained = model.get("pretrained")
    if isinstance(pretrained, str) and is_local_checkpoint(pretrained):
        return {**model, "pretrained": Path(pretrained).name}
    return model


# A model identity in an answer (/readyz, /collections, /embed/*)
PublicModel = Annotated[dict[str, Any], AfterValidator(_public_model)]


class ImageHit(BaseModel):
    image_id: str
    score: float = Field(description="Ranking score: the cosine similarity between the query and the image, plus "
                                     "the image's hubness offset for a text query when the collection has one "
                                     "(GET /collections, `hubness_images`)")
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
                                     "offset (-beta x how much of a hub the caption is) for an image query when the "
                                     "collection has one (GET /collections, `hubness`)")
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
    model: PublicModel
    index: dict[str, str] = Field(description="Search kind per target: exact (small) or hnsw")
    version: str
    hubness: dict[str, Any] | None = Field(None, description="The image→caption hubness correction (beta, k, "
                                                             "query bank) its caption offsets were made with")
    hubness_images: dict[str, Any] | None = Field(None, description="The text→image one its image offsets "
                                                                    "were made with")
    metadata_fields: dict[str, list[Any]] = Field(
        description="Metadata fields with few distinct values, and those values (filter choices)")
    watch: dict[str, Any] | None = Field(None, description="The folder watcher feeding it (`offline watch`): mode, "
                                                           "pending files, last scan, bad files, counters; null "
                                                           "when none runs")


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
    model: PublicModel | None = None
    index_version: str | None = None
    default_collection: str | None = None
    collections: dict[str, dict[str, int]] | None = Field(
        None, description="Images and captions of each served collection")
    images: int | None = Field(None, description="Images across the served collections")
    captions: int | None = None
    hubness: dict[str, Any] | None = Field(None, description="The image→caption hubness correction of the "
                                                             "default collection (beta, k, query bank), if any")
    hubness_images: dict[str, Any] | None = Field(None, description="Its text→image hubness correction, if any")


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


# --- query inputs beyond text and uploads: JSON images, vectors, weighted terms, embeddings out ---

MAX_VECTOR_DIM = 8192


def base64_chars(max_bytes: int) -> int:
    """The longest base64 text (or data: URI) accepted for an image of at most `max_bytes`: its
    base64 length plus room for line breaks and the data-URI prefix. The decoded size is what
    `app.inputs.decode_base64_image` holds to the exact cap."""
    return (max_bytes + 2) // 3 * 4 * 105 // 100 + 1024


def _image_fields(settings: Settings) -> dict[str, Any]:
    chars = base64_chars(settings.max_upload_bytes)
    return {
        # Not nullable (leave a field out instead): the schema then says "exactly one" by `oneOf`.
        "image": (Annotated[str, StringConstraints(min_length=1, max_length=chars)], Field(
            None, description=f"The image as base64 (standard or URL-safe, padding optional) or a "
                              f"data:image/...;base64, URI; at most {settings.max_upload_bytes} bytes "
                              f"once decoded")),
        "image_url": (Annotated[str, StringConstraints(min_length=1, max_length=2048)], Field(
            None, description="An http(s) URL the server fetches the image from (only when the server "
                              "runs with CLIPSEARCH_FETCH_URLS=1; public hosts, see docs/limits.md)")),
    }


ONE_IMAGE_SCHEMA = {"oneOf": [{"required": ["image"]}, {"required": ["image_url"]}]}
ONE_TERM_SCHEMA = {"oneOf": [{"required": ["text"]}, {"required": ["image_id"]}, {"required": ["image"]}]}


def _one_image(model: Any) -> Any:
    if (model.image is None) == (model.image_url is None):
        raise ValueError("give exactly one of image (base64) and image_url")
    return model


def image_json_request(settings: Settings) -> type[BaseModel]:
    """The application/json body of POST /search/image: the form's fields, the image as base64 or a URL."""
    return create_model(
        "ImageSearchJsonRequest",
        __config__=ConfigDict(extra="forbid", json_schema_extra={**ONE_IMAGE_SCHEMA, "examples": [
            {"image": "data:image/png;base64,iVBORw0KGgo...", "k": settings.default_k, "target": "images"}]}),
        __validators__={"one_image": model_validator(mode="after")(_one_image)},
        target=(Target, Field("images", description="images (similar images) or captions")),
        **_image_fields(settings), **_common_fields(settings))


def embed_image_request(settings: Settings) -> type[BaseModel]:
    return create_model(
        "EmbedImageRequest",
        __config__=ConfigDict(extra="forbid", json_schema_extra={**ONE_IMAGE_SCHEMA, "examples": [
            {"image": "data:image/png;base64,iVBORw0KGgo..."}]}),
        __validators__={"one_image": model_validator(mode="after")(_one_image)},
        **_image_fields(settings))


def vector_search_request(settings: Settings) -> type[BaseModel]:
    number = Annotated[float, Field(strict=True)]
    return create_model(
        "VectorSearchRequest",
        __config__=ConfigDict(extra="forbid", json_schema_extra={"examples": [
            {"vector": [0.012, -0.034, 0.051], "target": "images", "k": settings.default_k}]}),
        vector=(Annotated[list[number], Field(min_length=1, max_length=MAX_VECTOR_DIM)], Field(
            description="A query vector of the collection's dimension (GET /collections, or the `dim` of "
                        "POST /embed/*); normalised before the search; NaN, infinity and zero refused")),
        target=(Target, Field("images", description="images or captions")),
        **_common_fields(settings))


def _one_term_input(term: Any) -> Any:
    given = [name for name in ("text", "image_id", "image") if getattr(term, name) is not None]
    if len(given) != 1:
        raise ValueError("each term holds exactly one of text, image_id and image")
    return term


def query_text(settings: Settings) -> Any:
    """A query text as /search/text takes it: 1..max_query_chars, not only whitespace, normalised."""
    return Annotated[str, StringConstraints(min_length=1, max_length=settings.max_query_chars),
                     AfterValidator(_normalized_query), Field(json_schema_extra={"pattern": f"[^{WHITESPACE}]"})]


def terms_search_request(settings: Settings, max_terms: int) -> type[BaseModel]:
    """The POST /search body: a weighted sum of text, collection-image and uploaded-image terms."""
    text = query_text(settings)
    term = create_model(
        "QueryTerm",
        __config__=ConfigDict(extra="forbid", json_schema_extra=ONE_TERM_SCHEMA),
        __validators__={"one_input": model_validator(mode="after")(_one_term_input)},
        text=(text, Field(None, description="A text, encoded like a /search/text query")),
        image_id=(Annotated[str, StringConstraints(min_length=1, max_length=1024)],
                  Field(None, description="An item of the searched collection (its stored vector; the "
                                          "item itself is left out of the results)")),
        image=(Annotated[str, StringConstraints(min_length=1, max_length=base64_chars(settings.max_upload_bytes))],
               Field(None, description="An image as base64 or a data: URI")),
        weight=(Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-100, le=100)],
                Field(1.0, description="How much of this term's direction goes into the query; negative "
                                       "steers away from it")),
    )
    return create_model(
        "TermsSearchRequest",
        __config__=ConfigDict(extra="forbid", json_schema_extra={"examples": [
            {"terms": [{"text": "a beach", "weight": 1.0}, {"text": "people", "weight": -0.5}],
             "k": settings.default_k},
            {"terms": [{"image_id": "1000268201_693b08cb0e.jpg", "weight": 1.0},
                       {"text": "at night", "weight": 0.7}]}]}),
        terms=(Annotated[list[term], Field(min_length=1, max_length=max_terms)],  # type: ignore[valid-type]
               Field(description=f"1..{max_terms} terms; the query is the normalised weighted sum of "
                                 f"their unit vectors")),
        target=(Target, Field("images", description="images or captions")),
        **_common_fields(settings))


def embed_text_request(settings: Settings) -> type[BaseModel]:
    text = query_text(settings)
    return create_model(
        "EmbedTextRequest",
        __config__=ConfigDict(extra="forbid", json_schema_extra={"examples": [
            {"texts": ["a dog running on the beach", "two children playing"]}]}),
        texts=(Annotated[list[text], Field(min_length=1, max_length=settings.max_embed_texts)], Field(
            description=f"1..{settings.max_embed_texts} texts, normalised as search queries are")))


class EmbeddingsResponse(BaseModel):
    embeddings: list[list[float]] = Field(description="One L2-normalised vector per input, in order")
    dim: int
    model: PublicModel = Field(description="The model identity the vectors come from (as GET /readyz)")
    took_ms: float


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
