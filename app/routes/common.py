"""What every route module shares: the Content-Type check, reading an upload under its cap, the
Server-Timing header, the error responses the query routes document, a JSON body's image, and the
links an answer gives to an item's media (GET /images/{id}, GET /thumbnails/{id})."""

from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

from fastapi import Request, UploadFile

from clipsearch.images import ImageDecodeError

from app.engine import ImageSource
from app.errors import PayloadTooLarge, UnsupportedMediaType
from app.schemas import ErrorResponse

# Room for the multipart boundaries, part headers and the k field around the file itself.
MULTIPART_OVERHEAD = 16 * 1024

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


def server_timing(stages: Mapping[str, float] | None, took: float) -> str:
    """A `Server-Timing` header (W3C): the work stages of a computed answer, or `cache` for a hit,
    then `total` (the handler's time), in milliseconds. Browsers' dev tools and benchmarks read it."""
    parts = ["cache;desc=hit"] if stages is None else [f"{name};dur={sec * 1000:.3f}" for name, sec in stages.items()]
    return ", ".join([*parts, f"total;dur={took * 1000:.3f}"])


def image_source(body: Any) -> ImageSource:
    return ImageSource(base64=body.image, url=body.image_url)


async def read_upload(file: UploadFile, cap: int) -> bytes:
    """An uploaded file's bytes: never more than one byte past `cap` is read (413 then), and an empty
    file is an invalid image (422)."""
    data = await file.read(cap + 1)
    if len(data) > cap:
        raise PayloadTooLarge(f"image upload is larger than {cap} bytes")
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    return data


def media_url(collection: str, default_collection: str, image_id: str, kind: str = "images") -> str:
    """The path of an item's image (`kind` "images") or thumbnail ("thumbnails"); an item of another
    collection than the default one names it."""
    url = f"/{kind}/{quote(image_id, safe='')}"
    return url if collection == default_collection else f"{url}?collection={quote(collection, safe='')}"
