"""The write routes: add, delete and re-caption media of a served collection, and compact it.

    POST   /collections/{name}/media                      multipart: file, caption (repeated), metadata, image_id
    DELETE /collections/{name}/media/{image_id}
    PUT    /collections/{name}/media/{image_id}/captions   {"captions": [...]}
    POST   /collections/{name}/compact

Mounted only when writes are enabled (CLIPSEARCH_WRITES=1 or CLIPSEARCH_WRITE_TOKEN; otherwise these
paths answer 404), behind scope write (app/main.py; compact needs admin). Each handler makes one
engine call (`app.engine`; the work itself is in `app.writes`). Like app/routes/search.py, no
`from __future__ import annotations`: FastAPI resolves the signatures.
"""

import re
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import StringConstraints

from app.config import Settings
from app.auth import require
from app.deps import EngineDep
from app.errors import NotFound
from app.routes.common import MULTIPART_OVERHEAD, media_url, read_upload, require_content_type, server_timing
from app.schemas import CaptionsRequest, CompactResponse, ErrorResponse, WriteItemResponse
from app.writes import WriteResult

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


def build_router(settings: Settings) -> APIRouter:
    upload_cap = settings.max_upload_bytes

    router = APIRouter(tags=["writes"], responses=ERRORS)

    def item_body(engine: Any, collection: str, result: WriteResult) -> dict[str, Any]:
        item, default = result.item, engine.require_ready().default_collection
        return WriteItemResponse(
            image_id=item.image_id, collection=collection, image_url=media_url(collection, default, item.image_id),
            thumbnail_url=media_url(collection, default, item.image_id, "thumbnails"), captions=list(item.captions),
            metadata=dict(item.metadata), created=result.created, version=result.version).model_dump()

    @router.post("/collections/{name}/media", response_model=WriteItemResponse, status_code=201,
                 dependencies=[Depends(require_content_type("multipart/form-data"))],
                 summary="Add an image (with captions and metadata) to a collection; the same bytes "
                         "again answer 200 with the one item")
    async def upload(
        name: str, engine: EngineDep,
        file: Annotated[UploadFile, File(description=f"The image, at most {upload_cap} bytes")],
        caption: Annotated[list[Annotated[str, StringConstraints(min_length=1, max_length=settings.max_query_chars)]],
                           Form(description="A caption (repeat the field for several)")] = None,  # type: ignore[assignment]
        metadata: Annotated[str, Form(max_length=settings.max_metadata_bytes,
                                      description='A JSON object, e.g. {"album": "2024"}')] = None,  # type: ignore[assignment]
        image_id: Annotated[ImageId, Form(description="The item's id (default: the sha256 of the bytes)")] = None,  # type: ignore[assignment]
    ) -> Response:
        t0 = time.perf_counter()
        collection, result = await engine.upload(name, lambda: read_upload(file, upload_cap), caption, metadata,
                                                 image_id)
        took = time.perf_counter() - t0
        return JSONResponse(item_body(engine, collection, result), status_code=201 if result.created else 200,
                            headers={"Server-Timing": server_timing(dict(result.stages), took)})

    @router.delete("/collections/{name}/media/{image_id:path}", status_code=204, response_class=Response,
                   summary="Remove an item: it is never in a search again and /images/{id} answers 404")
    async def delete(name: str, image_id: str, engine: EngineDep) -> Response:
        if image_id.endswith("/captions"):
            raise NotFound("not found")
        await engine.delete(name, image_id)
        return Response(status_code=204)

    @router.put("/collections/{name}/media/{image_id:path}/captions", response_model=WriteItemResponse,
                dependencies=[Depends(require_content_type("application/json"))],
                summary="Replace an item's captions (its image vector stays)")
    async def put_captions(name: str, image_id: str, body: CaptionsRequest, engine: EngineDep) -> Response:
        collection, result = await engine.replace_captions(name, image_id, body.captions)
        return JSONResponse(item_body(engine, collection, result))

    @router.post("/collections/{name}/compact", response_model=CompactResponse,
                 dependencies=[Depends(require("admin"))],
                 summary="Rebuild the collection's index without its tombstones and swap it in (it also "
                         "runs by itself past CLIPSEARCH_COMPACT_TOMBSTONES / _DELTA)")
    async def compact(name: str, engine: EngineDep) -> CompactResponse:
        collection, out = await engine.compact(name)
        return CompactResponse(collection=collection, compacted=bool(out.get("compacted")),
                               seconds=out.get("seconds"), images=out.get("images"),
                               captions=out.get("captions"), reason=out.get("reason"))

    return router

