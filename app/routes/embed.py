"""POST /embed/text and POST /embed/image: the served model's normalised vectors, for clients that
build on the engine (their own index, clustering, dedup). Admitted and metered like searches."""

import time
from typing import Annotated

from fastapi import APIRouter, Depends, File, UploadFile
from fastapi.responses import Response

from app.config import Settings
from app.deps import EngineDep
from app.engine import Embeddings, Engine
from app.routes.content_routing import JsonRoute, json_body_openapi
from app.routes.common import ERRORS, image_source, read_upload, require_content_type
from app.schemas import EmbeddingsResponse, embed_image_request, embed_text_request


def _response(engine: Engine, endpoint: str, out: Embeddings, t0: float) -> Response:
    took = time.perf_counter() - t0
    engine.metrics.observe_stages(endpoint, {"total": took})
    vectors = out.vectors
    body = EmbeddingsResponse(embeddings=[[float(x) for x in v] for v in vectors], dim=int(vectors.shape[1]),
                              model=dict(out.model), took_ms=round(took * 1000, 3))
    timing = ", ".join([*(f"{k};dur={v * 1000:.3f}" for k, v in out.stages.items()), f"total;dur={took * 1000:.3f}"])
    return Response(body.model_dump_json(), media_type="application/json", headers={"Server-Timing": timing})


def build_router(settings: Settings) -> APIRouter:
    router = APIRouter(tags=["embed"])
    TextRequest = embed_text_request(settings)
    ImageJsonRequest = embed_image_request(settings)
    cap = settings.max_upload_bytes

    @router.post("/embed/text", response_model=EmbeddingsResponse, responses=ERRORS,
                 dependencies=[Depends(require_content_type("application/json"))],
                 summary="The model's normalised text vectors")
    async def embed_text(body: TextRequest, engine: EngineDep) -> Response:  # type: ignore[valid-type]
        t0 = time.perf_counter()
        return _response(engine, "embed_text", await engine.embed_texts(list(body.texts)), t0)

    async def embed_image_json(body: ImageJsonRequest, engine: EngineDep) -> Response:  # type: ignore[valid-type]
        t0 = time.perf_counter()
        return _response(engine, "embed_image", await engine.embed_image(image_source(body)), t0)

    router.add_api_route("/embed/image", embed_image_json, methods=["POST"], include_in_schema=False,
                         response_model=EmbeddingsResponse, route_class_override=JsonRoute)

    @router.post("/embed/image", response_model=EmbeddingsResponse, responses=ERRORS,
                 dependencies=[Depends(require_content_type("multipart/form-data", "application/json"))],
                 openapi_extra=json_body_openapi(ImageJsonRequest),
                 summary="The model's normalised vector of one image (multipart `file`, or JSON `image` "
                         "as base64 / `image_url`)")
    async def embed_image(engine: EngineDep, file: Annotated[UploadFile, File(
            description=f"JPEG/PNG/WebP/... image, at most {cap} bytes")]) -> Response:
        t0 = time.perf_counter()
        return _response(engine, "embed_image", await engine.embed_image(lambda: read_upload(file, cap)), t0)

    return router
