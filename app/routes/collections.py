"""GET /collections (what is served, with counts, model, index and filter fields) and
GET /collections/{name}/items/{image_id} (one item's captions and metadata)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from clipsearch.artifacts import ArtifactLayout
from clipsearch.watch_status import read_watch_status

from app.errors import NotFound
from app.schemas import CollectionInfo, CollectionsResponse, ErrorResponse, ItemResponse
from app.search import image_url, resolve
from app.state import get_state

router = APIRouter(tags=["collections"])


@router.get("/collections", response_model=CollectionsResponse,
            responses={503: {"model": ErrorResponse, "description": "Not ready"}},
            summary="The served collections: counts, model, index kind, metadata fields")
async def list_collections(request: Request) -> CollectionsResponse:
    res = get_state(request).require_ready()
    infos = [CollectionInfo(default=name == res.default_collection, **store.describe(),
                            watch=watch_status(get_state(request).settings.artifacts_dir, name))
             for name, store in sorted(res.collections.items())]
    return CollectionsResponse(default=res.default_collection, collections=infos, skipped=dict(res.skipped))


@router.get("/collections/{name}/items/{image_id:path}", response_model=ItemResponse,
            responses={404: {"model": ErrorResponse, "description": "Unknown collection or image id"},
                       503: {"model": ErrorResponse, "description": "Not ready"}},
            summary="One item: its captions and metadata")
async def get_item(name: str, image_id: str, request: Request) -> ItemResponse:
    res = get_state(request).require_ready()
    store = resolve(res, name)
    item = store.get(image_id)
    if item is None:
        raise NotFound("unknown image id")
    return ItemResponse(image_id=item.image_id, collection=store.name,
                        image_url=image_url(res, store.name, item.image_id),
                        thumbnail_url=image_url(res, store.name, item.image_id, "thumbnails"),
                        captions=list(item.captions), metadata=dict(item.metadata))


def watch_status(artifacts_dir, name: str) -> dict | None:
    """What the folder watcher of collection `name` last said (None when none runs)."""
    return read_watch_status(ArtifactLayout(artifacts_dir).collection(name).watch_status)
