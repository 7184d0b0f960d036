"""The links an answer gives to an item's media (GET /images/{id}, GET /thumbnails/{id})."""

from __future__ import annotations

from urllib.parse import quote


def media_url(collection: str, default_collection: str, image_id: str, kind: str = "images") -> str:
    """The path of an item's image (`kind` "images") or thumbnail ("thumbnails"); an item of another
    collection than the default one names it."""
    url = f"/{kind}/{quote(image_id, safe='')}"
    return url if collection == default_collection else f"{url}?collection={quote(collection, safe='')}"
