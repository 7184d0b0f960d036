"""POST /search/text, /search/image (multipart or JSON), /search/similar, /search/vector and /search
(weighted terms): each validates its request, makes one engine call (`app.engine`) and maps the page
of plain results to its response model.

The request models are built from this app's Settings, so the module deliberately has no
`from __future__ import annotations`: FastAPI has to resolve the closure-local model types in the
signatures.
"""

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import Response
from pydantic import TypeAdapter, ValidationError

from clipsearch.artifacts import COLLECTION_NAME

from app.answer_cache import answer_body, offer_answer
from app.config import Settings
from app.deps import EngineDep
from app.engine import Engine, Page, TermInput
from app.errors import InvalidSearch
from app.inputs import MAX_TERMS
from app.routes.common import ERRORS, MULTIPART_OVERHEAD, image_source, media_url, read_upload, \
    require_content_type, server_timing
from app.routes.content_routing import JsonRoute, json_body_openapi
from app.schemas import CaptionHit, ImageHit, ImageSearchResponse, MetadataFilter, \
    TextSearchResponse, base64_chars, image_json_request, similar_request, terms_search_request, \
    text_search_request, vector_search_request
from app.search import CaptionResult, Options

# Paths admitted (and 429'd) as searches, with their metrics label.
SEARCH_PATHS = {"/search/text": "text", "/search/image": "image", "/search/similar": "similar",
                "/search/vector": "vector", "/search": "terms", "/embed/text": "embed_text",
                "/embed/image": "embed_image"}
DEFAULT_BODY_LIMIT = 64 * 1024  # JSON bodies; a 1000-character query needs a few KB
# The longest JSON spelling of one query character: an escaped surrogate pair, "\ud83d\ude00".
JSON_BYTES_PER_CHAR = 12
# The `filter` form field of /search/image (JSON text).
MAX_FILTER_FORM_CHARS = 16384


def body_limits(settings: Settings) -> dict[str, int]:
    """Per-path request body caps enforced by BodyLimitMiddleware (others: DEFAULT_BODY_LIMIT)."""
    text = max(DEFAULT_BODY_LIMIT, settings.max_query_chars * JSON_BYTES_PER_CHAR + 4096)
    # A JSON image is base64: the body may be 4/3 of the upload cap (the decoded bytes keep the cap).
    image = max(settings.max_upload_bytes + MULTIPART_OVERHEAD, base64_chars(settings.max_upload_bytes)
                + MULTIPART_OVERHEAD)
    # Weighted terms: up to MAX_TERMS texts, and images whose base64 shares one image-sized budget.
    terms = max(image, MAX_TERMS * text)
    embed_text = max(DEFAULT_BODY_LIMIT, settings.max_embed_texts * settings.max_query_chars
                     * JSON_BYTES_PER_CHAR + 4096)
    # A 4096-d vector of 25-character numbers is ~100 KB.
    return {"/search/image": image, "/search/text": text, "/search": terms, "/embed/image": image,
            "/embed/text": embed_text, "/search/vector": 256 * 1024}


_HITS_JSON = {"images": TypeAdapter(list[ImageHit]), "captions": TypeAdapter(list[CaptionHit])}
_FILTER = TypeAdapter(MetadataFilter)


def hit_models(page: Page) -> list[ImageHit] | list[CaptionHit]:
    """A page's plain results as response models, with the links to each item's image and thumbnail."""
    coll, default = page.spec.collection, page.default_collection
    out: list[Any] = []
    for r in page.results:
        urls = {"image_url": media_url(coll, default, r.image_id),
                "thumbnail_url": media_url(coll, default, r.image_id, "thumbnails")}
        if isinstance(r, CaptionResult):
            out.append(CaptionHit(caption_id=r.caption_id, caption=r.caption, image_id=r.image_id, score=r.score,
                                  cosine=r.cosine, rank=r.rank, **urls))
        else:
            out.append(ImageHit(image_id=r.image_id, score=r.score, rank=r.rank, captions=list(r.captions),
                                metadata=dict(r.metadata), **urls))
    return out


def search_response(request: Request, engine: Engine, endpoint: str, page: Page, t0: float,
                    with_target: bool = False) -> Response:
    """The TextSearchResponse / ImageSearchResponse of a page (its JSON assembled by `answer_body`,
    which the raw answer cache shares), with its Server-Timing; the handler's total is metered."""
    spec = page.spec
    results = page.memo.get("json")
    if results is None:  # serialised once per cache entry
        results = page.memo["json"] = _HITS_JSON[spec.target].dump_json(hit_models(page))
    fields = {**({"target": spec.target} if with_target else {}), "k": spec.k, "offset": spec.offset,
              "collection": spec.collection}
    offer_answer(request.scope, results, fields)
    took = time.perf_counter() - t0
    engine.metrics.observe_stages(endpoint, {"total": took})
    return Response(answer_body(results, fields, took, cached=page.stages is None), media_type="application/json",
                    headers={"Server-Timing": server_timing(page.stages, took)})


def options(body: Any, target: str = "images") -> Options:
    """The search options of a validated request body (text, similar, vector, terms, JSON image)."""
    return Options(body.collection, body.k, body.offset, body.min_score, body.filter, target)


def _form_filter(raw: str | None) -> dict[str, Any] | None:
    """The `filter` form field of an image search: the same JSON object /search/text takes (JSON
    null, like an empty or missing field, is no filter)."""
    if raw is None or not raw.strip() or raw.strip() == "null":
        return None
    try:
        return _FILTER.validate_json(raw)
    except ValidationError:
        raise InvalidSearch("filter must be a JSON object of metadata fields to values (or lists of values)") from None


def build_router(settings: Settings) -> APIRouter:
    router = APIRouter(tags=["search"])
    TextSearchRequest = text_search_request(settings)
    SimilarRequest = similar_request(settings)
    ImageJsonRequest = image_json_request(settings)
    VectorRequest = vector_search_request(settings)
    TermsRequest = terms_search_request(settings, MAX_TERMS)
    k_form = Form(ge=1, le=settings.max_k, description=f"How many results (1..{settings.max_k})")
    upload_cap = settings.max_upload_bytes

    @router.post("/search/text", response_model=TextSearchResponse, responses=ERRORS,
                 dependencies=[Depends(require_content_type("application/json"))],
                 summary="Images that match a text query")
    async def search_text(body: TextSearchRequest, request: Request, engine: EngineDep) -> Response:
        t0 = time.perf_counter()
        # the query is already normalised (NFC, whitespace collapsed) by the request model
        page = await engine.search_text(body.query, options(body))
        return search_response(request, engine, "text", page, t0)

    async def search_image_json(body: ImageJsonRequest, request: Request, engine: EngineDep) -> Response:  # type: ignore[valid-type]
        t0 = time.perf_counter()
        page = await engine.search_image(image_source(body), options(body, body.target))
        return search_response(request, engine, "image", page, t0, with_target=True)

    # First: it takes the application/json requests, the multipart handler below everything else.
    router.add_api_route("/search/image", search_image_json, methods=["POST"], include_in_schema=False,
                         response_model=ImageSearchResponse, route_class_override=JsonRoute)

    @router.post("/search/image", response_model=ImageSearchResponse, responses=ERRORS,
                 dependencies=[Depends(require_content_type("multipart/form-data", "application/json"))],
                 openapi_extra=json_body_openapi(ImageJsonRequest),
                 summary="Similar images (target=images) or matching captions (target=captions) of an "
                         "uploaded image (multipart `file`) or a JSON one (`image` as base64 or a "
                         "data: URI, or `image_url`)")
    async def search_image(
        request: Request, engine: EngineDep,
        file: Annotated[UploadFile, File(description=f"JPEG/PNG/WebP/... image, at most "
                                                     f"{upload_cap} bytes")],
        k: Annotated[int, k_form] = settings.default_k,
        target: Annotated[Literal["images", "captions"], Form(description="images (similar images, each "
                                                                         "once) or captions")] = "images",
        # Optional form fields are typed without null (a form has no null; leave the field out), so
        # the schema does not invite clients to send the text "null".
        collection: Annotated[str, Form(pattern=COLLECTION_NAME.pattern, description="Collection to "
                                        "search (default: the service's default collection)")] = None,  # type: ignore[assignment]
        offset: Annotated[int, Form(ge=0, le=settings.max_offset, description="Results to skip, for the "
                                    f"next page (0..{settings.max_offset})")] = 0,
        min_score: Annotated[float, Form(ge=-2, le=2, allow_inf_nan=False, description="Leave out results "
                                         "scoring below this")] = None,  # type: ignore[assignment]
        filter: Annotated[str, Form(max_length=MAX_FILTER_FORM_CHARS, description=(
            "Metadata filter as JSON text, the same object /search/text takes, e.g. "
            '{"kind": "photo"} or {"folder": ["2019", "2020"]}'))] = None,  # type: ignore[assignment]
    ) -> Response:
        t0 = time.perf_counter()
        page = await engine.search_image(lambda: read_upload(file, upload_cap),
                                         Options(collection, k, offset, min_score, _form_filter(filter), target))
        return search_response(request, engine, "image", page, t0, with_target=True)

    @router.post("/search/similar", response_model=TextSearchResponse, responses=ERRORS,
                 dependencies=[Depends(require_content_type("application/json"))],
                 summary="More images like one already in the collection (no upload)")
    async def search_similar(body: SimilarRequest, request: Request, engine: EngineDep) -> Response:
        t0 = time.perf_counter()
        page = await engine.search_similar(body.image_id, options(body))
        return search_response(request, engine, "similar", page, t0)

    @router.post("/search/vector", response_model=ImageSearchResponse, responses=ERRORS,
                 dependencies=[Depends(require_content_type("application/json"))],
                 summary="Images or captions nearest to a query vector (e.g. from POST /embed/*)")
    async def search_by_vector(body: VectorRequest, request: Request, engine: EngineDep) -> Response:  # type: ignore[valid-type]
        t0 = time.perf_counter()
        page = await engine.search_vector(body.vector, options(body, body.target))
        return search_response(request, engine, "vector", page, t0, with_target=True)

    @router.post("/search", response_model=ImageSearchResponse, responses=ERRORS,
                 dependencies=[Depends(require_content_type("application/json"))],
                 summary="A weighted, mixed query: texts, images of the collection and uploaded images, "
                         "each with a weight (negative steers away)")
    async def search_terms(body: TermsRequest, request: Request, engine: EngineDep) -> Response:  # type: ignore[valid-type]
        t0 = time.perf_counter()
        terms = [TermInput(t.weight, text=t.text, image_id=t.image_id, image=t.image) for t in body.terms]
        page = await engine.search_terms(terms, options(body, body.target))
        return search_response(request, engine, "terms", page, t0, with_target=True)

    return router
