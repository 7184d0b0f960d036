"""POST /search/text, POST /search/image and GET /images/{image_id}.

Handlers stay on the event loop only for cheap work (validation, cache lookup, reading the upload);
decode, encode and search run on the bounded inference pool. The request models are built from this
app's Settings, so the module deliberately has no `from __future__ import annotations`: FastAPI has
to resolve the closure-local model types in the signatures.
"""

import json
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Annotated, Any
from urllib.parse import quote

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, Response
from pydantic import TypeAdapter

from clipsearch.images import ImageDecodeError, decode_image

from app.cache import image_key, text_key
from app.config import Settings
from app.errors import NotFound, PayloadTooLarge, UnsupportedMediaType
from app.resources import Resources
from app.schemas import CaptionHit, ErrorResponse, ImageHit, ImageSearchResponse, TextSearchResponse, \
    text_search_request
from app.state import ServiceState, get_state

SEARCH_PATHS = {"/search/text": "text", "/search/image": "image"}
DEFAULT_BODY_LIMIT = 64 * 1024  # JSON bodies; a 1000-character query needs a few KB
# Room for the multipart boundaries, part headers and the k field around the file itself.
MULTIPART_OVERHEAD = 16 * 1024
# The longest JSON spelling of one query character: an escaped surrogate pair, "\ud83d\ude00".
JSON_BYTES_PER_CHAR = 12


def body_limits(settings: Settings) -> dict[str, int]:
    """Per-path request body caps enforced by BodyLimitMiddleware (others: DEFAULT_BODY_LIMIT)."""
    text = max(DEFAULT_BODY_LIMIT, settings.max_query_chars * JSON_BYTES_PER_CHAR + 4096)
    return {"/search/image": settings.max_upload_bytes + MULTIPART_OVERHEAD, "/search/text": text}


ERRORS = {status: {"model": ErrorResponse, "description": desc} for status, desc in {
    400: "Body could not be parsed (not UTF-8, broken multipart)",
    413: "Body or upload too large", 415: "Wrong Content-Type", 422: "Invalid request or image",
    429: "Too many searches in flight; retry after Retry-After seconds",
    503: "Model and indexes not loaded (yet); the message says why"}.items()}


def require_content_type(*allowed: str) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type not in allowed:
            raise UnsupportedMediaType(f"Content-Type must be {' or '.join(allowed)}, "
                                       f"not {media_type or 'missing'}")
    return check


def _image_url(image_id: str) -> str:
    return f"/images/{quote(image_id, safe='')}"


def _rows(ids: np.ndarray, scores: np.ndarray) -> list[tuple[int, float]]:
    return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]


def text_hits(res: Resources, scores: np.ndarray, ids: np.ndarray) -> tuple[ImageHit, ...]:
    hits = []
    for rank, (row, score) in enumerate(_rows(ids[None], scores[None]), 1):
        image_id = res.images[row].image_id
        hits.append(ImageHit(image_id=image_id, score=score, rank=rank, image_url=_image_url(image_id),
                             captions=list(res.captions_by_image.get(image_id, ()))))
    return tuple(hits)


def image_search_job(res: Resources, data: bytes, k: int, max_pixels: int
                     ) -> tuple[tuple[CaptionHit, ...], dict[str, float]]:
    t0 = time.perf_counter()
    image = decode_image(data, max_pixels=max_pixels)
    t1 = time.perf_counter()
    try:
        vec = res.encoder.encode_images([image])
    finally:
        image.close()
    t2 = time.perf_counter()
    scores, ids = res.text_index.search(vec, k)
    t3 = time.perf_counter()
    hits = []
    for rank, (row, score) in enumerate(_rows(ids, scores), 1):
        c = res.captions[row]
        hits.append(CaptionHit(caption_id=c.caption_id, caption=c.caption, image_id=c.image_id,
                               score=score, cosine=score - float(res.caption_offsets[row]), rank=rank))
    return tuple(hits), {"decode": t1 - t0, "encode": t2 - t1, "search": t3 - t2}


_HITS_JSON = {"text": TypeAdapter(list[ImageHit]), "image": TypeAdapter(list[CaptionHit])}


async def _cached(state: ServiceState, endpoint: str, key: Hashable,
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
    body = _HITS_JSON[endpoint].dump_json(list(hits))
    state.cache.put(key, body)
    state.metrics.cache_entries.set(len(state.cache))
    return body, stages


def server_timing(stages: dict[str, float] | None, took: float) -> str:
    """A `Server-Timing` header (W3C): the work stages of a computed answer, or `cache` for a hit,
    then `total` (the handler's time), in milliseconds. Browsers' dev tools and benchmarks read it."""
    parts = ["cache;desc=hit"] if stages is None else [f"{name};dur={sec * 1000:.3f}" for name, sec in stages.items()]
    return ", ".join([*parts, f"total;dur={took * 1000:.3f}"])


def _search_response(results_json: bytes, k: int, took: float, stages: dict[str, float] | None) -> Response:
    """The TextSearchResponse / ImageSearchResponse JSON, assembled around the cached results."""
    tail = json.dumps({"k": k, "took_ms": round(took * 1000, 3), "cached": stages is None})
    return Response(b'{"results":' + results_json + b"," + tail[1:].encode(), media_type="application/json",
                    headers={"Server-Timing": server_timing(stages, took)})


def build_router(settings: Settings) -> APIRouter:
    router = APIRouter(tags=["search"])
    TextSearchRequest = text_search_request(settings)
    k_form = Form(ge=1, le=settings.max_k, description=f"How many results (1..{settings.max_k})")
    upload_cap = settings.max_upload_bytes

    @router.post("/search/text", response_model=TextSearchResponse, responses=ERRORS,
                 dependencies=[Depends(require_content_type("application/json"))],
                 summary="Images that match a text query")
    async def search_text(body: TextSearchRequest, request: Request) -> Response:
        state = get_state(request)
        res = state.require_ready()
        t0 = time.perf_counter()
        query = body.query  # already normalised (NFC, whitespace collapsed) by the request model
        async def compute() -> tuple[tuple[ImageHit, ...], dict[str, float]]:
            scores, ids, stages = await state.batcher.search(res, query, body.k)
            return text_hits(res, scores, ids), {s: v for s, v in stages.items() if s != "batch_size"}

        results, stages = await _cached(state, "text", text_key(query, body.k, res.version), compute)
        took = time.perf_counter() - t0
        state.metrics.observe_stages("text", {"total": took})
        return _search_response(results, body.k, took, stages)

    @router.post("/search/image", response_model=ImageSearchResponse, responses=ERRORS,
                 dependencies=[Depends(require_content_type("multipart/form-data"))],
                 summary="Captions that match an uploaded image")
    async def search_image(
        request: Request,
        file: Annotated[UploadFile, File(description=f"JPEG/PNG/WebP/... image, at most "
                                                     f"{upload_cap} bytes")],
        k: Annotated[int, k_form] = settings.default_k,
    ) -> Response:
        state = get_state(request)
        res = state.require_ready()
        t0 = time.perf_counter()
        data = await file.read(upload_cap + 1)  # never more than one byte past the cap
        if len(data) > upload_cap:
            raise PayloadTooLarge(f"image upload is larger than {upload_cap} bytes")
        if not data:
            raise ImageDecodeError("empty file (0 bytes)")
        results, stages = await _cached(state, "image", image_key(data, k, res.version),
                                        lambda: state.run(image_search_job, res, data, k,
                                                          settings.max_image_pixels))
        took = time.perf_counter() - t0
        state.metrics.observe_stages("image", {"total": took})
        return _search_response(results, k, took, stages)

    @router.get("/images/{image_id:path}", response_class=FileResponse, tags=["images"],
                responses={200: {"description": "The image file, as stored",
                                 "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}}},
                           404: {"model": ErrorResponse, "description": "Unknown image id"},
                           422: ERRORS[422], 503: ERRORS[503]},
                summary="The image file of an indexed image id")
    async def get_image(image_id: str, request: Request) -> FileResponse:
        res = get_state(request).require_ready()
        # Only ids from the served metadata map to files; the client never supplies a path.
        path = res.image_files.get(image_id)
        if path is None:
            raise NotFound("unknown image id")
        if not path.is_file():
            raise NotFound("image file not available on this server")
        return FileResponse(path, headers={"Cache-Control": "public, max-age=3600",
                                           "X-Content-Type-Options": "nosniff"})

    return router
