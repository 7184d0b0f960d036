"""Two handlers on one path, chosen by the request's Content-Type.

`POST /search/image` takes a multipart upload or a JSON body (base64 image or image URL). FastAPI
binds one body shape per handler, so the JSON handler is registered first with `JsonRoute`, which
matches only `application/json` requests; everything else falls through to the multipart handler
(which answers 415 for types neither takes). The JSON handler is left out of the OpenAPI schema and
its body is described as a second content type of the multipart operation (`json_body_openapi`).
"""

from __future__ import annotations

from typing import Any

from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.routing import Match
from starlette.types import Scope


def media_type(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            return value.decode("latin-1").split(";")[0].strip().lower()
    return ""


class JsonRoute(APIRoute):
    """An APIRoute that matches only requests whose Content-Type is application/json."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is not Match.NONE and media_type(scope) != "application/json":
            return Match.NONE, {}
        return match, child


def json_body_openapi(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` adding `model` as the operation's application/json request body (inlined:
    the JSON handler itself is not in the schema, so its model is not among the components)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    if "$defs" in schema:  # keep the inlined schema self-contained
        raise ValueError(f"{model.__name__} must not need $defs to be inlined in OpenAPI")
    return {"requestBody": {"content": {"application/json": {"schema": schema}}}}
