"""GET /images/{image_id} (the file as stored) and GET /thumbnails/{image_id} (a small JPEG).

Only ids of the served collections map to files; a client never supplies a path.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, Response

from clipsearch.artifacts import COLLECTION_NAME

from app.deps import EngineDep
from app.schemas import ErrorResponse

router = APIRouter(tags=["images"])

CollectionParam = Annotated[str | None, Query(pattern=COLLECTION_NAME.pattern,
                                              description="Collection (default: the default one)")]
_ERRORS = {404: {"model": ErrorResponse, "description": "Unknown collection or image id"},
           503: {"model": ErrorResponse, "description": "Not ready"}}


@router.get("/images/{image_id:path}", response_class=FileResponse,
            responses={200: {"description": "The image file, as stored",
                             "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}}},
                       **_ERRORS, 422: {"model": ErrorResponse, "description": "Invalid request"}},
            summary="The image file of an item")
async def get_image(image_id: str, engine: EngineDep, collection: CollectionParam = None) -> FileResponse:
    _, path = engine.media_file(collection, image_id)
    return FileResponse(path, headers={"Cache-Control": "public, max-age=3600",
                                       "X-Content-Type-Options": "nosniff"})


@router.get("/thumbnails/{image_id:path}", response_class=Response,
            responses={200: {"description": "A JPEG at most CLIPSEARCH_THUMBNAIL_PX on its longest side",
                             "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}},
                       304: {"description": "Not modified (If-None-Match matched the ETag)"},
                       **_ERRORS, 422: {"model": ErrorResponse, "description": "The stored image cannot be decoded"}},
            summary="A small JPEG of an item, for result grids")
async def get_thumbnail(image_id: str, request: Request, engine: EngineDep,
                        collection: CollectionParam = None) -> Response:
    # (an ImageDecodeError, a stored file that is no image, is answered 422 invalid_image)
    thumb = await engine.thumbnail(collection, image_id)
    headers = {"ETag": thumb.etag, "Cache-Control": "public, max-age=86400",
               "X-Content-Type-Options": "nosniff"}
    if etag_matches(request.headers.get("if-none-match"), thumb.etag):
        return Response(status_code=304, headers=headers)
    return Response(thumb.data, media_type="image/jpeg", headers=headers)


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 If-None-Match: `*`, or a comma-separated list of entity tags compared weakly
    (`W/"x"` matches `"x"`)."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    tags = (t.strip() for t in if_none_match.split(","))
    return any((t[2:] if t.startswith("W/") else t) == etag for t in tags)
