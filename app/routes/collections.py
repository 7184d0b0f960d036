"""GET /collections (what is served, with counts, model, index and filter fields) and
GET /collections/{name}/items/{image_id} (one item's captions and metadata)."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import EngineDep
from app.routes.common import media_url
from app.schemas import CollectionInfo, CollectionsResponse, ErrorResponse, ItemResponse

router = APIRouter(tags=["collections"])


@router.get("/collections", response_model=CollectionsResponse,
            responses={503: {"model": ErrorResponse, "description": "Not ready"}},
            summary="The served collections: counts, model, index kind, metadata fields")
async def list_collections(engine: EngineDep) -> CollectionsResponse:
    res = engine.require_ready()
    infos = [CollectionInfo(default=name == res.default_collection, **store.describe(),
                            watch=engine.watch_status(name))
             for name, store in sorted(res.collections.items())]
    return CollectionsResponse(default=res.default_collection, collections=infos, skipped=dict(res.skipped))


@router.get("/collections/{name}/items/{image_id:path}", response_model=ItemResponse,
            responses={404: {"model": ErrorResponse, "description": "Unknown collection or image id"},
                       503: {"model": ErrorResponse, "description": "Not ready"}},
            summary="One item: its captions and metadata")
async def get_item(name: str, image_id: str, engine: EngineDep) -> ItemResponse:
    collection, item = engine.item(name, image_id)
    default = engine.require_ready().default_collection
    return ItemResponse(image_id=item.image_id, collection=collection,
                        image_url=media_url(collection, default, item.image_id),
                        thumbnail_url=media_url(collection, default, item.image_id, "thumbnails"),
                        captions=list(item.captions), metadata=dict(item.metadata))

