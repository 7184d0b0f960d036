"""POST /admin/reload: load new artifacts in the background and swap them in without downtime.

Mounted only when CLIPSEARCH_ADMIN_TOKEN is set, and then only for `Authorization: Bearer <token>`.
The same reload runs on SIGHUP (see app.main). Until the new model and indexes are loaded the old
ones keep serving; if loading fails they stay, and /readyz shows `reload_error`.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.config import Settings
from app.deps import EngineDep
from app.errors import Unauthorized
from app.schemas import ErrorResponse, ReloadResponse


def build_router(settings: Settings, start_reload: Callable[[], Any]) -> APIRouter:
    assert settings.admin_token is not None
    expected = settings.admin_token.get_secret_value().encode()
    router = APIRouter(tags=["admin"])

    @router.post("/admin/reload", response_model=ReloadResponse, status_code=202,
                 summary="Reload model and indexes from ARTIFACTS_DIR in the background",
                 responses={401: {"model": ErrorResponse, "description": "Missing or wrong bearer token"}})
    async def reload(request: Request, engine: EngineDep) -> JSONResponse:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise Unauthorized("a valid admin bearer token is required",
                               headers={"WWW-Authenticate": "Bearer"})
        current = engine.resources
        started = start_reload() is not None
        body = ReloadResponse(started=started, index_version=current.version if current else None)
        return JSONResponse(body.model_dump(), status_code=202)

    return router
