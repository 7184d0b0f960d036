"""Request and response models. Limits come from Settings, so request models are built per app by
`text_search_request(settings)`; the OpenAPI schema at /docs shows the limits actually enforced."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, create_model

from app.cache import WHITESPACE, normalize_query
from app.config import Settings


class ImageHit(BaseModel):
    image_id: str
    score: float = Field(description="Cosine similarity between the query and the image")
    rank: int = Field(ge=1)
    image_url: str = Field(description="Path of GET /images/{image_id}")
    captions: list[str] = Field(description="The image's captions in the served split")


class CaptionHit(BaseModel):
    caption_id: str
    caption: str
    image_id: str
    score: float = Field(description="Ranking score: the cosine similarity, minus the caption's hubness "
                                     "offset when the caption index has one (GET /readyz, `hubness`)")
    cosine: float = Field(description="Cosine similarity between the query image and the caption")
    rank: int = Field(ge=1)


class TextSearchResponse(BaseModel):
    results: list[ImageHit]
    k: int
    took_ms: float = Field(description="Server time for this request in milliseconds")
    cached: bool = Field(description="Answered from the response cache")


class ImageSearchResponse(BaseModel):
    results: list[CaptionHit]
    k: int
    took_ms: float
    cached: bool


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
    split: str | None = None
    images: int | None = None
    captions: int | None = None
    hubness: dict[str, Any] | None = Field(None, description="The image→caption hubness correction of the "
                                                             "caption index (beta, k, query bank), if any")


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


def text_search_request(settings: Settings) -> type[BaseModel]:
    """The POST /search/text body model with this app's limits; `query` arrives normalised
    (NFC, whitespace runs collapsed), which is also the form that is encoded and cached."""
    # The length limit counts the characters as sent (what the schema's maxLength says); the
    # pattern tells schema readers what the validator enforces: at least one non-whitespace character.
    query = Annotated[str, StringConstraints(min_length=1, max_length=settings.max_query_chars),
                      AfterValidator(_normalized_query)]
    k_desc = f"How many results (1..{settings.max_k})"
    return create_model(
        "TextSearchRequest",
        __config__=ConfigDict(extra="forbid", json_schema_extra={"examples": [
            {"query": "a dog running on the beach", "k": settings.default_k}]}),
        query=(query, Field(description=f"Search text, 1..{settings.max_query_chars} characters, not "
                                        f"only whitespace; trimmed, whitespace runs collapsed, NFC",
                            json_schema_extra={"pattern": f"[^{WHITESPACE}]"})),
        k=(Annotated[int, BeforeValidator(_whole_number)], Field(settings.default_k, ge=1, le=settings.max_k, strict=True, description=k_desc)),
    )
