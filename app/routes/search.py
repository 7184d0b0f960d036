"""POST /search/text, /search/image (multipart or JSON), /search/similar, /search/vector and /search
(weighted terms).

Handlers stay on the event loop only for cheap work (validation, cache lookup, reading the upload);
decode, encode and search run on the bounded inference pool. The request models are built from this
app's Settings, so the module deliberately has no `from __future__ import annotations`: FastAPI has
to resolve the closure-local model types in the signatures.
"""

import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import Response
from pydantic import TypeAdapter, ValidationError

from clipsearch.artifacts import COLLECTION_NAME
from clipsearch.images import ImageDecodeError
from clipsearch.store import VectorStore

from app.config import Settings
from app.errors import InvalidSearch, PayloadTooLarge, UnsupportedMediaType
from app.inputs import MAX_TERMS, InputError, check_weights, decode_base64_image, validate_vector
from app.resources import Resources
from app.routes.content_routing import JsonRoute, json_body_openapi
from app.schemas import CaptionHit, ErrorResponse, ImageHit, ImageSearchResponse, MetadataFilter, \
    TextSearchResponse, base64_chars, image_json_request, similar_request, terms_search_request, \
    text_search_request, vector_search_request
from app.search import SearchSpec, Term, image_search, resolve, search_vector, similar_job, spec_for, \
    terms_job, vector_job
from app.state import ServiceState, get_state

# Paths admitted (and 429'd) as searches, with their metrics label.
SEARCH_PATHS = {"/search/text": "text", "/search/image": "image", "/search/similar": "similar",
                "/search/vector": "vector", "/search": "terms", "/embed/text": "embed_text",
                "/embed/image": "embed_image"}
DEFAULT_BODY_LIMIT = 64 * 1024  # JSON bodies; a 1000-character query needs a few KB
# Room for the multipart boundaries, part headers and the k field around the file itself.
MULTIPART_OVERHEAD = 16 * 1024
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


ERRORS = {status: {"model": ErrorResponse, "description": desc} for status, desc in {
    400: "Body could not be parsed (not UTF-8, broken multipart); image_url not a usable http(s) URL",
    403: "image_url refused: URL fetching off, host not allowed, or a non-public address",
    404: "Unknown collection (or, for /search/similar, image id)",
    413: "Body or image too large", 415: "Wrong Content-Type", 422: "Invalid request or image",
    429: "Too many searches in flight; retry after Retry-After seconds",
    502: "image_url could not be fetched", 503: "Model and indexes not loaded (yet); the message says why",
    504: "image_url took longer than the fetch timeout"}.items()}


def require_content_type(*allowed: str) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type not in allowed:
            raise UnsupportedMediaType(f"Content-Type must be {' or '.join(allowed)}, "
                                       f"not {media_type or 'missing'}")
    return check


_HITS_JSON = {"images": TypeAdapter(list[ImageHit]), "captions": TypeAdapter(list[CaptionHit])}
_FILTER = TypeAdapter(MetadataFilter)


async def _cached(state: ServiceState, endpoint: str, key: Hashable, target: str,
                  compute: Callable[[], Awaitable[tuple[tuple[Any, ...], dict[str, float]]]]
                  ) -> tuple[bytes, dict[str, float] | None]:
    """The cached results (a JSON array, serialised once) for `key` and None, or `await compute()`
    (work on the inference pool), serialise and cache them, and return its stage timings. A hit then
    costs no model validation at all."""
    body = state.cache.get(key)
    if body is not None:
        state.metrics.cache_hits.labels(endpoint).inc()
        return body, None
    state.metrics.cache_misses.labels(endpoint).inc()
    hits, stages = await compute()
    state.metrics.observe_stages(endpoint, stages)
    body = _HITS_JSON[target].dump_json(list(hits))
    state.cache.put(key, body)
    state.metrics.cache_entries.set(len(state.cache))
    return body, stages


def server_timing(stages: dict[str, float] | None, took: float) -> str:
    """A `Server-Timing` header (W3C): the work stages of a computed answer, or `cache` for a hit,
    then `total` (the handler's time), in milliseconds. Browsers' dev tools and benchmarks read it."""
    parts = ["cache;desc=hit"] if stages is None else [f"{name};dur={sec * 1000:.3f}" for name, sec in stages.items()]
    return ", ".join([*parts, f"total;dur={took * 1000:.3f}"])


def _search_response(results_json: bytes, spec: SearchSpec, took: float, stages: dict[str, float] | None,
                     with_target: bool = False) -> Response:
    """The TextSearchResponse / ImageSearchResponse JSON, assembled around the cached results."""
    tail = json.dumps({**({"target": spec.target} if with_target else {}), "k": spec.k, "offset": spec.offset,
                       "collection": spec.collection, "took_ms": round(took * 1000, 3),
                       "cached": stages is None})
    return Response(b'{"results":' + results_json + b"," + tail[1:].encode(), media_type="application/json",
                    headers={"Server-Timing": server_timing(stages, took)})


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

    async def image_answer(state: ServiceState, res: Resources, store: VectorStore, spec: SearchSpec, data: bytes, t0: float,
                           fetch_s: float | None = None) -> Response:
        """The answer to an image query, whichever body brought the bytes (an upload and the same
        bytes as base64 share one cache entry)."""
        key = spec.cache_key("image", hashlib.sha256(data).hexdigest(), res.version)
        results, stages = await _cached(state, "image", key, spec.target,
                                        lambda: image_search(state, res, store, spec, data,
                                                             settings.max_image_pixels))
        if stages is not None and fetch_s is not None:
            stages = {"fetch": fetch_s, **stages}
        took = time.perf_counter() - t0
        state.metrics.observe_stages("image", {"total": took})
        return _search_response(results, spec, took, stages, with_target=True)

    @router.post("/search/text", response_model=TextSearchResponse, responses=ERRORS,
                 dependencies=[Depends(require_content_type("application/json"))],
                 summary="Images that match a text query")
    async def search_text(body: TextSearchRequest, request: Request) -> Response:
        state = get_state(request)
        res = state.require_ready()
        t0 = time.perf_counter()
        store, spec = spec_for(res, body)
        query = body.query  # already normalised (NFC, whitespace collapsed) by the request model

        async def compute() -> tuple[tuple[ImageHit, ...], dict[str, float]]:
            hits, stages = await state.batcher.search(res, query, lambda vec: search_vector(res, store, spec, vec))
            return hits, {s: v for s, v in stages.items() if s != "batch_size"}

        results, stages = await _cached(state, "text", spec.cache_key("text", query, res.version), "images",
                                        compute)
        took = time.perf_counter() - t0
        state.metrics.observe_stages("text", {"total": took})
        return _search_response(results, spec, took, stages)

    async def search_image_json(body: ImageJsonRequest, request: Request) -> Response:  # type: ignore[valid-type]
        state = get_state(request)
        res = state.require_ready()
        t0 = time.perf_counter()
        store, spec = spec_for(res, body, body.target)
        data, fetch_s = await image_bytes(state, body)
        return await image_answer(state, res, store, spec, data, t0, fetch_s)

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
        request: Request,
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
        state = get_state(request)
        res = state.require_ready()
        t0 = time.perf_counter()
        store = resolve(res, collection)
        spec = SearchSpec(store.name, k, offset, min_score, _form_filter(filter), target)
        data = await read_upload(file, upload_cap)
        return await image_answer(state, res, store, spec, data, t0)

    @router.post("/search/similar", response_model=TextSearchResponse, responses=ERRORS,
                 dependencies=[Depends(require_content_type("application/json"))],
                 summary="More images like one already in the collection (no upload)")
    async def search_similar(body: SimilarRequest, request: Request) -> Response:
        state = get_state(request)
        res = state.require_ready()
        t0 = time.perf_counter()
        store, spec = spec_for(res, body)
        key = spec.cache_key("similar", body.image_id, res.version)
        results, stages = await _cached(state, "similar", key, "images",
                                        lambda: state.run(similar_job, res, store, spec, body.image_id))
        took = time.perf_counter() - t0
        state.metrics.observe_stages("similar", {"total": took})
        return _search_response(results, spec, took, stages)

    @router.post("/search/vector", response_model=ImageSearchResponse, responses=ERRORS,
                 dependencies=[Depends(require_content_type("application/json"))],
                 summary="Images or captions nearest to a query vector (e.g. from POST /embed/*)")
    async def search_by_vector(body: VectorRequest, request: Request) -> Response:  # type: ignore[valid-type]
        state = get_state(request)
        res = state.require_ready()
        t0 = time.perf_counter()
        store, spec = spec_for(res, body, body.target)
        vec = validate_vector(body.vector, store.dim)
        key = spec.cache_key("vector", hashlib.sha256(vec.tobytes()).hexdigest(), res.version)
        results, stages = await _cached(state, "vector", key, body.target,
                                        lambda: state.run(vector_job, res, store, spec, vec))
        took = time.perf_counter() - t0
        state.metrics.observe_stages("vector", {"total": took})
        return _search_response(results, spec, took, stages, with_target=True)

    @router.post("/search", response_model=ImageSearchResponse, responses=ERRORS,
                 dependencies=[Depends(require_content_type("application/json"))],
                 summary="A weighted, mixed query: texts, images of the collection and uploaded images, "
                         "each with a weight (negative steers away)")
    async def search_terms(body: TermsRequest, request: Request) -> Response:  # type: ignore[valid-type]
        state = get_state(request)
        res = state.require_ready()
        t0 = time.perf_counter()
        store, spec = spec_for(res, body, body.target)
        check_weights([t.weight for t in body.terms], MAX_TERMS)  # before any encoding
        cap, image_bytes_total = settings.max_upload_bytes, 0  # the cap holds for all images together
        terms = []
        for t in body.terms:
            if t.image is not None:
                data = decode_base64_image(t.image, cap)
                image_bytes_total += len(data)
                if image_bytes_total > cap:
                    raise InputError("payload_too_large", f"the images of one query together are larger "
                                                          f"than the {cap:,}-byte limit")
                terms.append(Term("image", data, t.weight))
            elif t.image_id is not None:
                terms.append(Term("image_id", t.image_id, t.weight))
            else:
                terms.append(Term("text", t.text, t.weight))
        key = spec.cache_key("terms", tuple(t.cache_part() for t in terms), res.version)
        results, stages = await _cached(state, "terms", key, body.target,
                                        lambda: state.run(terms_job, res, store, spec, terms,
                                                          settings.max_image_pixels, settings.query_image_tta))
        took = time.perf_counter() - t0
        state.metrics.observe_stages("terms", {"total": took})
        return _search_response(results, spec, took, stages, with_target=True)

    return router


async def read_upload(file: UploadFile, cap: int) -> bytes:
    """An uploaded file's bytes: never more than one byte past `cap` is read (413 then), and an empty
    file is an invalid image (422)."""
    data = await file.read(cap + 1)
    if len(data) > cap:
        raise PayloadTooLarge(f"image upload is larger than {cap} bytes")
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    return data


async def image_bytes(state: ServiceState, body: Any) -> tuple[bytes, float | None]:
    """The image of a JSON body (`image` base64 or `image_url`) under the upload cap, and the fetch's
    seconds when it came from a URL."""
    cap = state.settings.max_upload_bytes
    if body.image is not None:
        return decode_base64_image(body.image, cap), None
    t0 = time.perf_counter()
    data = await state.fetcher.fetch(body.image_url)
    if not data:
        raise ImageDecodeError("the image URL answered an empty body")
    return data, time.perf_counter() - t0
