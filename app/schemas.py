"""Request and response models. Limits come from Settings, so request models are built per app by
`text_search_request(settings)`; the OpenAPI schema at /docs shows the limits actually enforced."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model

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
    score: float = Field(description="Cosine similarity between the query image and the caption")
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
    model: dict[str, Any] | None = None
    index_version: str | None = None
    split: str | None = None
    images: int | None = None
    captions: int | None = None


def text_search_request(settings: Settings) -> type[BaseModel]:
    """The POST /search/text body model with this app's limits."""
    query = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1,
                                             max_length=settings.max_query_chars)]
    k_desc = f"How many results (1..{settings.max_k})"
    return create_model(
        "TextSearchRequest",
        __config__=ConfigDict(extra="forbid", json_schema_extra={"examples": [
            {"query": "a dog running on the beach", "k": settings.default_k}]}),
        query=(query, Field(description=f"Search text, 1..{settings.max_query_chars} characters "
                                        f"after trimming")),
        k=(int, Field(settings.default_k, ge=1, le=settings.max_k, strict=True, description=k_desc)),
    )
