"""POST /embed/text and POST /embed/image: the served model's normalised vectors, for clients that
build on the engine (their own index, clustering, dedup). Admitted and metered like searches."""

import time
from typing import Annotated

from fastapi import APIRouter, Depends, File, Request, UploadFile
from fastapi.responses import Response

from clipsearch.images import decode_image

from app.config import Settings
from app.resources import Resources
from app.routes.content_routing import JsonRoute, json_body_openapi
from app.routes.search import ERRORS, image_bytes, read_upload, require_content_type
from app.schemas import EmbeddingsResponse, embed_image_request, embed_text_request
from app.state import get_state


def _response(res: Resources, vectors, took: float, stages: dict[str, float]) -> Response:
    body = EmbeddingsResponse(embeddings=[[float(x) for x in v] for v in vectors], dim=int(vectors.shape[1]),
                              model=dict(res.model), took_ms=round(took * 1000, 3))
    timing = ", ".join([*(f"{k};dur={v * 1000:.3f}" for k, v in stages.items()), f"total;dur={took * 1000:.3f}"])
    return Response(body.model_dump_json(), media_type="application/json", headers={"Server-Timing": timing})


def _encode_texts(res: Resources, texts: list[str], batch: int) -> tuple[object, dict[str, float]]:
    import numpy as np
    t0 = time.perf_counter()
    parts = [res.encoder.encode_texts(texts[i:i + batch]) for i in range(0, len(texts), batch)]
    return np.concatenate(parts), {"encode": time.perf_counter() - t0}


def _encode_image(res: Resources, data: bytes, max_pixels: int) -> tuple[object, dict[str, float]]:
    t0 = time.perf_counter()
    image = decode_image(data, max_pixels=max_pixels)
    t1 = time.perf_counter()
    try:
        vecs = res.encoder.encode_images([image])
    finally:
        image.close()
    return vecs, {"decode": t1 - t0, "encode": time.perf_counter() - t1}


def build_router(settings: Settings) -> APIRouter:
    router = APIRouter(tags=["embed"])
    TextRequest = embed_text_request(settings)
    ImageJsonRequest = embed_image_request(settings)
    cap = settings.max_upload_bytes

    @router.post("/embed/text", response_model=EmbeddingsResponse, responses=ERRORS,
                 dependencies=[Depends(require_content_type("application/json"))],
                 summary="The model's normalised text vectors")
    async def embed_text(body: TextRequest, request: Request) -> Response:  # type: ignore[valid-type]
        state = get_state(request)
        res = state.require_ready()
        t0 = time.perf_counter()
        vecs, stages = await state.run(_encode_texts, res, list(body.texts), settings.text_batch_size)
        took = time.perf_counter() - t0
        state.metrics.observe_stages("embed_text", {**stages, "total": took})
        return _response(res, vecs, took, stages)

    async def embed_image_json(body: ImageJsonRequest, request: Request) -> Response:  # type: ignore[valid-type]
        state = get_state(request)
        res = state.require_ready()
        t0 = time.perf_counter()
        data, fetch_s = await image_bytes(state, body)
        vecs, stages = await state.run(_encode_image, res, data, settings.max_image_pixels)
        if fetch_s is not None:
            stages = {"fetch": fetch_s, **stages}
        took = time.perf_counter() - t0
        state.metrics.observe_stages("embed_image", {**stages, "total": took})
        return _response(res, vecs, took, stages)

    router.add_api_route("/embed/image", embed_image_json, methods=["POST"], include_in_schema=False,
                         response_model=EmbeddingsResponse, route_class_override=JsonRoute)

    @router.post("/embed/image", response_model=EmbeddingsResponse, responses=ERRORS,
                 dependencies=[Depends(require_content_type("multipart/form-data", "application/json"))],
                 openapi_extra=json_body_openapi(ImageJsonRequest),
                 summary="The model's normalised vector of one image (multipart `file`, or JSON `image` "
                         "as base64 / `image_url`)")
    async def embed_image(request: Request, file: Annotated[UploadFile, File(
            description=f"JPEG/PNG/WebP/... image, at most {cap} bytes")]) -> Response:
        state = get_state(request)
        res = state.require_ready()
        t0 = time.perf_counter()
        data = await read_upload(file, cap)
        vecs, stages = await state.run(_encode_image, res, data, settings.max_image_pixels)
        took = time.perf_counter() - t0
        state.metrics.observe_stages("embed_image", {**stages, "total": took})
        return _response(res, vecs, took, stages)

    return router
