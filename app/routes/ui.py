"""GET / (the search page) and GET /static/{name} (its script, style sheet and icon).

The page is plain HTML, CSS and JS shipped in app/static/ (no build step, no CDN). The files are read
once when the router is built and served from memory with a strong ETag, so a browser revalidates
with If-None-Match and gets a 304. The page links its assets as `/static/app.js?v=<etag>`, so an
asset fetched with the current version may be cached for a year; the HTML itself is `no-cache`
(always revalidated), which is how a new release reaches browsers. A strict Content-Security-Policy
(scripts and styles only from this origin, nothing inline) limits what injected markup could do;
the page itself inserts captions and metadata as text, never as HTML.

The page needs scope read (app/auth.py); a caller without a key still gets it, with status 401, so a
browser shows its sign-in form. Its script and style (no data) need no key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.auth import get_auth
from app.errors import NotFound, Unauthorized
from app.routes.media import etag_matches

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# The files the page is made of; nothing else under static/ is served (no path from a client).
ASSETS = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8",
          "icon.svg": "image/svg+xml"}
PAGE = "index.html"

# blob: is the preview of a picked image (URL.createObjectURL); everything else is this origin.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
       "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
VERSIONED_CACHE = "public, max-age=31536000, immutable"
UNVERSIONED_CACHE = "no-cache"


@dataclass(frozen=True)
class Asset:
    data: bytes
    media_type: str
    etag: str

    @classmethod
    def of(cls, data: bytes, media_type: str) -> Asset:
        return cls(data, media_type, '"' + hashlib.sha256(data).hexdigest()[:20] + '"')

    @property
    def version(self) -> str:
        return self.etag.strip('"')


def load_assets(static_dir: Path = STATIC_DIR) -> tuple[Asset, dict[str, Asset]]:
    """The page (with its asset links versioned) and the assets, read from `static_dir`."""
    assets = {name: Asset.of((static_dir / name).read_bytes(), media_type) for name, media_type in ASSETS.items()}
    html = (static_dir / PAGE).read_text(encoding="utf-8")
    for name, asset in assets.items():
        html = html.replace(f'"/static/{name}"', f'"/static/{name}?v={asset.version}"')
    return Asset.of(html.encode("utf-8"), "text/html; charset=utf-8"), assets


def _answer(request: Request, asset: Asset, headers: dict[str, str]) -> Response:
    headers = {**headers, "ETag": asset.etag}
    if etag_matches(request.headers.get("if-none-match"), asset.etag):
        return Response(status_code=304, headers=headers)
    return Response(asset.data, media_type=asset.media_type, headers=headers)


def build_router(static_dir: Path = STATIC_DIR) -> APIRouter:
    page, assets = load_assets(static_dir)
    # Not part of the API: kept out of the OpenAPI schema (and so out of the schema fuzzing).
    router = APIRouter(tags=["page"], include_in_schema=False)

    @router.get("/")
    async def index(request: Request) -> Response:
        try:
            get_auth(request).check(request, "read")
        except Unauthorized:
            return Response(page.data, status_code=401, media_type=page.media_type,
                            headers={**PAGE_HEADERS, "WWW-Authenticate": "Bearer"})
        return _answer(request, page, PAGE_HEADERS)

    @router.get("/static/{name}")
    async def static(name: str, request: Request, v: str | None = None) -> Response:
        asset = assets.get(name)
        if asset is None:
            raise NotFound("no such file")
        cache = VERSIONED_CACHE if v == asset.version else UNVERSIONED_CACHE
        return _answer(request, asset, {"Cache-Control": cache, "X-Content-Type-Options": "nosniff"})

    return router
