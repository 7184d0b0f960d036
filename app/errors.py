"""The one error shape, `{"error": {"code", "message"[, "details"]}}`, and the domain-error table.

Every non-2xx answer except /readyz's own body goes through `error_response`, so clients parse one
shape for validation errors, 404s, 413s, 429s, 503s and the (never expected) 500.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from clipsearch.images import ImageDecodeError
from clipsearch.manifest import ArtifactError
from clipsearch.models import ModelLoadError

from app.fetch import FetchError
from app.inputs import InputError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the service answers on purpose; the message is safe to show a client."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})


class NotReady(ApiError):
    status, code = 503, "not_ready"


class Overloaded(ApiError):
    status, code = 429, "overloaded"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class NotFound(ApiError):
    status, code = 404, "not_found"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class InvalidSearch(ApiError):
    """A well-formed request the collection cannot answer as asked (e.g. a filter value no item holds)."""

    status, code = 422, "invalid_request"


# Domain errors raised by the shared core, mapped to (status, code) in this one place.
DOMAIN_ERRORS: dict[type[Exception], tuple[int, str]] = {
    ImageDecodeError: (422, "invalid_image"),
    ArtifactError: (503, "not_ready"),
    ModelLoadError: (503, "not_ready"),
}

# Starlette's own HTTPExceptions (router 404/405, body limit 413, multipart 400) get stable codes.
HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
              415: "unsupported_media_type", 429: "overloaded", 503: "not_ready"}


# FastAPI answers 400 with this detail when the body parser itself fails: bytes that are not UTF-8,
# JSON nested deeper than the parser's recursion limit, an integer literal over 4300 digits.
_FASTAPI_PARSE_DETAIL = "There was an error parsing the body"
PARSE_ERROR_MESSAGE = ("the request body could not be parsed: it must be UTF-8 JSON without extreme "
                       "nesting or numbers thousands of digits long")

# An absolute POSIX path that is not part of a word (so "ViT-B-32/openai" stays as it is).
_ABS_PATH = re.compile(r"""(?<![\w.~-])/[^\s'"`,;()\[\]{}<>]+""")


def public_reason(message: str, artifacts_dir: Path) -> str:
    """`message` without this server's file system layout: paths under ARTIFACTS_DIR become relative
    to it (as the resource checks already write them), any other absolute path on this machine only
    its file name. Placeholders such as `/path/to/weights.pt` in a hint are kept."""
    for root in {str(artifacts_dir), str(artifacts_dir.resolve())}:
        if root.startswith("/"):
            message = message.replace(root.rstrip("/") + "/", "")

    def scrub(match: re.Match[str]) -> str:
        path = Path(match.group())
        if len(path.parts) > 1 and not Path("/", path.parts[1]).exists():
            return match.group()
        return "…/" + (path.name or "…")

    return _ABS_PATH.sub(scrub, message)


def error_body(code: str, message: str, details: Sequence[dict[str, Any]] | None = None) -> dict:
    err: dict[str, Any] = {"code": code, "message": message}
    if details:
        err["details"] = list(details)
    return {"error": err}


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None,
                   details: Sequence[dict[str, Any]] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=status, headers=dict(headers or {}))


def _validation_details(errors: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    # Only location, message and type: the offending input is not echoed (it may be huge or binary).
    return [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")),
             "type": str(e.get("type", ""))} for e in errors]


def _summary(details: list[dict[str, Any]]) -> str:
    parts = []
    for d in details[:3]:
        loc = ".".join(p for p in d["loc"] if p not in ("body", "query", "path"))
        parts.append(f"{loc}: {d['msg']}" if loc else d["msg"])
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = _validation_details(exc.errors())
        return error_response(422, "invalid_request", _summary(details), details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 400 and message == _FASTAPI_PARSE_DETAIL:
            message = PARSE_ERROR_MESSAGE
        return error_response(exc.status_code, HTTP_CODES.get(exc.status_code, "http_error"), message,
                              exc.headers)

    @app.exception_handler(InputError)
    async def _input_error(_: Request, exc: InputError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message)

    @app.exception_handler(FetchError)
    async def _fetch_error(_: Request, exc: FetchError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message)

    for exc_type, (status, code) in DOMAIN_ERRORS.items():
        app.add_exception_handler(exc_type, _domain_handler(status, code))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not a client error: log it for us, tell the client nothing about internals.
        log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path,
                  exc_info=exc)
        return error_response(500, "internal_error", "internal server error")


def _domain_handler(status: int, code: str):
    async def handler(_: Request, exc: Exception) -> JSONResponse:
        return error_response(status, code, str(exc) or code)
    return handler
