"""The write routes: add, delete and re-caption media of a served collection, and compact it.

    POST   /collections/{name}/media                      multipart: file, caption (repeated), metadata, image_id
    DELETE /collections/{name}/media/{image_id}
    PUT    /collections/{name}/media/{image_id}/captions   {"captions": [...]}
    POST   /collections/{name}/compact

Mounted only when writes are enabled (CLIPSEARCH_WRITES=1 or CLIPSEARCH_WRITE_TOKEN; otherwise these
paths answer 404), behind scope write (app/main.py; compact needs admin). The work itself is in
`app.writes`. Like
app/routes/search.py, no `from __future__ import annotations`: FastAPI resolves the signatures.
"""

import asyncio
import json
import re
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import StringConstraints

from clipsearch.images import ImageDecodeError

from app.config import Settings
from app.auth import require
from app.errors import InvalidSearch, NotFound, PayloadTooLarge
from app.routes.search import MULTIPART_OVERHEAD, read_upload, require_content_type, server_timing
from app.schemas import CaptionsRequest, CompactResponse, ErrorResponse, WriteItemResponse
from app.search import image_url, resolve
from app.state import get_state
from app.writes import WriteResult, WriteService

MEDIA_PATH = re.compile(r"/collections/[^/]+/media")
ImageId = Annotated[str, StringConstraints(min_length=1, max_length=512, pattern=r"^[^\x00-\x1f\x7f]+$")]
ERRORS = {status: {"model": ErrorResponse, "description": desc} for status, desc in {
    404: "Unknown collection or image id",
    409: "The collection is open read-only", 413: "Upload too large", 415: "Wrong Content-Type",
    422: "Invalid image, captions or metadata", 429: "Too many writes in flight; retry after Retry-After",
    503: "Not ready"}.items()}


def body_limit_patterns(settings: Settings) -> list[tuple[re.Pattern[str], int]]:
    """The upload route's body cap for BodyLimitMiddleware (its path holds the collection name)."""
    extra = settings.max_captions * (settings.max_query_chars * 4 + 256) + settings.max_metadata_bytes
    return [(MEDIA_PATH, settings.max_upload_bytes + MULTIPART_OVERHEAD + extra)]


def build_router(settings: Settings, service: WriteService) -> APIRouter:
    upload_cap = settings.max_upload_bytes
    metrics = service.state.metrics

    router = APIRouter(tags=["writes"], responses=ERRORS)

    def item_body(res: Any, store: Any, result: WriteResult) -> dict[str, Any]:
        item = result.item
        return WriteItemResponse(
            image_id=item.image_id, collection=store.name, image_url=image_url(res, store.name, item.image_id),
            thumbnail_url=image_url(res, store.name, item.image_id, "thumbnails"), captions=list(item.captions),
            metadata=dict(item.metadata), created=result.created, version=result.version).model_dump()

    @router.post("/collections/{name}/media", response_model=WriteItemResponse, status_code=201,
                 dependencies=[Depends(require_content_type("multipart/form-data"))],
                 summary="Add an image (with captions and metadata) to a collection; the same bytes "
                         "again answer 200 with the one item")
    async def upload(
        name: str, request: Request,
        file: Annotated[UploadFile, File(description=f"The image, at most {upload_cap} bytes")],
        caption: Annotated[list[Annotated[str, StringConstraints(min_length=1, max_length=settings.max_query_chars)]],
                           Form(description="A caption (repeat the field for several)")] = None,  # type: ignore[assignment]
        metadata: Annotated[str, Form(max_length=settings.max_metadata_bytes,
                                      description='A JSON object, e.g. {"album": "2024"}')] = None,  # type: ignore[assignment]
        image_id: Annotated[ImageId, Form(description="The item's id (default: the sha256 of the bytes)")] = None,  # type: ignore[assignment]
    ) -> Response:
        t0 = time.perf_counter()
        state = get_state(request)
        res = state.require_ready()
        store = resolve(res, name)
        captions = _clean_captions(caption, settings.max_captions)
        meta = _parse_metadata(metadata)
        try:
            data = await read_upload(file, upload_cap)
        except (PayloadTooLarge, ImageDecodeError):
            metrics.writes.labels("upload", "invalid").inc()
            raise
        service.admit("upload")
        try:
            before = store.version
            result = await service.upload(res, store, data, captions, meta, image_id)
        except (ImageDecodeError, InvalidSearch):
            metrics.writes.labels("upload", "invalid").inc()
            raise
        except (NotFound, asyncio.CancelledError):
            raise
        except Exception:
            metrics.writes.labels("upload", "error").inc()
            raise
        finally:
            service.release()
        label = "created" if result.created else ("updated" if result.version != before else "existing")
        metrics.writes.labels("upload", label).inc()
        took = time.perf_counter() - t0
        return JSONResponse(item_body(res, store, result), status_code=201 if result.created else 200,
                            headers={"Server-Timing": server_timing(dict(result.stages), took)})

    @router.delete("/collections/{name}/media/{image_id:path}", status_code=204, response_class=Response,
                   summary="Remove an item: it is never in a search again and /images/{id} answers 404")
    async def delete(name: str, image_id: str, request: Request) -> Response:
        if image_id.endswith("/captions"):
            raise NotFound("not found")
        state = get_state(request)
        res = state.require_ready()
        store = resolve(res, name)
        service.admit("delete")
        try:
            await service.delete(store, image_id)
        except NotFound:
            metrics.writes.labels("delete", "not_found").inc()
            raise
        except Exception:
            metrics.writes.labels("delete", "error").inc()
            raise
        finally:
            service.release()
        metrics.writes.labels("delete", "deleted").inc()
        return Response(status_code=204)

    @router.put("/collections/{name}/media/{image_id:path}/captions", response_model=WriteItemResponse,
                dependencies=[Depends(require_content_type("application/json"))],
                summary="Replace an item's captions (its image vector stays)")
    async def put_captions(name: str, image_id: str, body: CaptionsRequest, request: Request) -> Response:
        state = get_state(request)
        res = state.require_ready()
        store = resolve(res, name)
        captions = _clean_captions(body.captions, settings.max_captions) or []
        service.admit("captions")
        try:
            result = await service.replace_captions(res, store, image_id, captions)
        except NotFound:
            metrics.writes.labels("captions", "not_found").inc()
            raise
        except Exception:
            metrics.writes.labels("captions", "error").inc()
            raise
        finally:
            service.release()
        metrics.writes.labels("captions", "replaced").inc()
        return JSONResponse(item_body(res, store, result))

    @router.post("/collections/{name}/compact", response_model=CompactResponse,
                 dependencies=[Depends(require("admin"))],
                 summary="Rebuild the collection's index without its tombstones and swap it in (it also "
                         "runs by itself past CLIPSEARCH_COMPACT_TOMBSTONES / _DELTA)")
    async def compact(name: str, request: Request) -> CompactResponse:
        res = get_state(request).require_ready()
        store = resolve(res, name)
        out = await asyncio.to_thread(service.compact_now, store)
        return CompactResponse(collection=store.name, compacted=bool(out.get("compacted")),
                               seconds=out.get("seconds"), images=out.get("images"),
                               captions=out.get("captions"), reason=out.get("reason"))

    return router


def _clean_captions(captions: list[str] | None, limit: int) -> list[str] | None:
    if captions is None:
        return None
    cleaned = [" ".join(c.split()) for c in captions]
    if any(not c for c in cleaned):
        raise InvalidSearch("a caption is empty or only whitespace")
    if len(cleaned) > limit:
        raise InvalidSearch(f"at most {limit} captions per item")
    return cleaned


def _parse_metadata(raw: str | None) -> dict[str, Any] | None:
    if raw is None or not raw.strip():
        return None
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise InvalidSearch("metadata must be a JSON object") from None
    if not isinstance(value, dict):
        raise InvalidSearch("metadata must be a JSON object")
    if len(value) > 64 or any(len(k) > 64 or not k for k in value):
        raise InvalidSearch("metadata: at most 64 fields, each name 1-64 characters")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
