"""POST /admin/reload: load new artifacts in the background and swap them in without downtime.

Mounted only when an API key is configured, behind scope admin (app/main.py, app/auth.py).
The same reload runs on SIGHUP (see app.main). Until the new model and indexes are loaded the old
ones keep serving; if loading fails they stay, and /readyz shows `reload_error`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.config import Settings
from app.deps import EngineDep
from app.schemas import ReloadResponse


def build_router(settings: Settings, start_reload: Callable[[], Any]) -> APIRouter:
    router = APIRouter(tags=["admin"])

    @router.post("/admin/reload", response_model=ReloadResponse, status_code=202,
                 summary="Reload model and indexes from ARTIFACTS_DIR in the background")
    async def reload(engine: EngineDep) -> JSONResponse:
        current = engine.resources
        started = start_reload() is not None
        body = ReloadResponse(started=started, index_version=current.version if current else None)
        return JSONResponse(body.model_dump(), status_code=202)

    return router
