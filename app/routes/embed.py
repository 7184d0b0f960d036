"""POST /embed/text and POST /embed/image: the served model's normalised vectors, for clients that
build on the engine (their own index, clustering, dedup). Admitted and metered like searches."""

import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, File, Request, UploadFile
from fastapi.responses import Response

from app.batching import ImageQuery
from app.config import Settings
from app.resources import Resources
from app.routes.content_routing import JsonRoute, json_body_openapi
from app.routes.search import ERRORS, image_bytes, read_upload, require_content_type
from app.schemas import EmbeddingsResponse, embed_image_request, embed_text_request
from app.state import ServiceState, get_state


def _response(res: Resources, vectors, took: float, stages: dict[str, float]) -> Response:
    body = EmbeddingsResponse(embeddings=[[float(x) for x in v] for v in vectors], dim=int(vectors.shape[1]),
                              model=dict(res.model), took_ms=round(took * 1000, 3))
    timing = ", ".join([*(f"{k};dur={v * 1000:.3f}" for k, v in stages.items()), f"total;dur={took * 1000:.3f}"])
    return Response(body.model_dump_json(), media_type="application/json", headers={"Server-Timing": timing})


def _encode_texts(res: Resources, texts: list[str], batch: int) -> tuple[np.ndarray, dict[str, float]]:
    t0 = time.perf_counter()
    parts = [res.encoder.encode_texts(texts[i:i + batch]) for i in range(0, len(texts), batch)]
    return np.concatenate(parts), {"encode": time.perf_counter() - t0}


async def _embed_image(state: ServiceState, res: Resources, data: bytes, max_pixels: int
                       ) -> tuple[np.ndarray, dict[str, float]]:
    """One image through the image micro-batcher (decoded with every check /search/image makes,
    embedded beside image queries and uploads), as a collection stores it (with the model's image_tta)."""
    vec, stages = await state.image_batcher.upload(res, ImageQuery(data, max_pixels, tta=True),
                                                   lambda v: np.asarray(v))
    return vec[None, :], {"decode": stages["decode"], "encode": stages["encode"]}


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
        vecs, stages = await _embed_image(state, res, data, settings.max_image_pixels)
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
        vecs, stages = await _embed_image(state, res, data, settings.max_image_pixels)
        took = time.perf_counter() - t0
        state.metrics.observe_stages("embed_image", {**stages, "total": took})
        return _response(res, vecs, took, stages)

    return router
