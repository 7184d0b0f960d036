"""GET /healthz (process up), GET /readyz (model and collections loaded), GET /metrics (Prometheus).

/healthz and /readyz need no key; /readyz shows the model and collections only to a caller that may
read. /metrics needs scope read unless CLIPSEARCH_METRICS_PUBLIC=1 (app.auth.metrics_access)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from app.auth import AUTH_RESPONSES, may, metrics_access
from app.deps import EngineDep
from app.schemas import HealthResponse, ReadyResponse

router = APIRouter(tags=["ops"])


@router.get("/healthz", response_model=HealthResponse, summary="Liveness: 200 while the process is up")
async def healthz() -> HealthResponse:
    return HealthResponse()


@router.get("/readyz", response_model=ReadyResponse, summary="Readiness: 200 once search can answer",
            responses={503: {"model": ReadyResponse, "description": "Not ready; `reason` says why"}})
async def readyz(request: Request, engine: EngineDep) -> Response:
    res = engine.resources
    if not may(request, "read"):  # ready or not, and nothing about what is served
        body = {"ready": res is not None}
        return JSONResponse(body, status_code=200 if res is not None else 503,
                            headers={} if res is not None else {"Retry-After": str(max(engine.settings.retry_after_s, 1))})
    if res is None:
        body = ReadyResponse(ready=False, reason=engine.reason).model_dump(exclude_none=True)
        return JSONResponse(body, status_code=503,
                            headers={"Retry-After": str(max(engine.settings.retry_after_s, 1))})
    counts = {name: {"images": store.count("images"), "captions": store.count("captions")}
              for name, store in sorted(res.collections.items())}
    body = ReadyResponse(
        ready=True, model=dict(res.model), index_version=res.version,
        default_collection=res.default_collection, collections=counts,
        images=res.image_count, captions=res.caption_count,
        # the default collection's corrections, read from the contract (describe() also counts facets)
        hubness=(default := res.store()).hubness, hubness_images=default.hubness_images,
        reloading=engine.loading or None, reload_error=engine.reload_error).model_dump()
    for optional in ("reloading", "reload_error"):
        if body[optional] is None:
            del body[optional]
    return JSONResponse(body)


@router.get("/metrics", response_class=Response, summary="Prometheus metrics (text format)",
            dependencies=[Depends(metrics_access)],
            responses={200: {"description": "Prometheus text exposition format",
                             "content": {"text/plain": {"schema": {"type": "string"}}}}, **AUTH_RESPONSES})
async def metrics(engine: EngineDep) -> Response:
    m = engine.metrics
    return Response(m.render(), media_type=m.content_type)
