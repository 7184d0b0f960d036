"""The one error base class (`ApiError`), the one table from error code to HTTP status (`STATUS`),
and the one error shape, `{"error": {"code", "message"[, "details"]}}`.

The engine and the input checks (`app.inputs`, `app.fetch`) raise `ApiError`s that say what went
wrong (a code and a message safe to show a client) and nothing about HTTP; `STATUS` alone decides
each code's status. Every non-2xx answer except /readyz's own body goes through `error_response`,
so clients parse one shape for validation errors, 404s, 413s, 429s, 503s and the (never expected) 500.
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

log = logging.getLogger(__name__)


# Every code an error of the service can carry, and its HTTP status: the one error table.
STATUS: dict[str, int] = {
    "bad_request": 400, "bad_url": 400, "unauthorized": 401, "fetch_disabled": 403, "url_forbidden": 403,
    "not_found": 404, "read_only": 409, "write_refused": 409, "payload_too_large": 413,
    "unsupported_media_type": 415, "invalid_image": 422, "invalid_request": 422, "overloaded": 429,
    "fetch_failed": 502, "not_ready": 503, "fetch_timeout": 504,
}


class ApiError(Exception):
    """An error the service answers on purpose (the base of every one); the message is safe to show a
    client. `code` says what went wrong; its HTTP status is `STATUS[code]`."""

    code = "bad_request"

    def __init__(self, message: str, headers: Mapping[str, str] | None = None, *, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.headers = dict(headers or {})

    @property
    def status(self) -> int:
        return STATUS[self.code]


class NotReady(ApiError):
    code = "not_ready"


class Overloaded(ApiError):
    code = "overloaded"


class UnsupportedMediaType(ApiError):
    code = "unsupported_media_type"


class PayloadTooLarge(ApiError):
    code = "payload_too_large"


class NotFound(ApiError):
    code = "not_found"


class Unauthorized(ApiError):
    code = "unauthorized"


class InvalidSearch(ApiError):
    """A well-formed request the collection cannot answer as asked (e.g. a filter value no item holds)."""

    code = "invalid_request"


class ReadOnlyCollection(ApiError):
    code = "read_only"


class WriteRefused(ApiError):
    """The store cannot take this write as it is laid out (e.g. a Qdrant collection copied before image
    offsets existed: `offline migrate` remakes it); nothing was written."""

    code = "write_refused"


# Errors raised by the shared core (which knows nothing of the service), and their codes.
CORE_ERRORS: dict[type[Exception], str] = {
    ImageDecodeError: "invalid_image",
    ArtifactError: "not_ready",
    ModelLoadError: "not_ready",
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

    for exc_type, code in CORE_ERRORS.items():
        app.add_exception_handler(exc_type, _core_handler(code))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not a client error: log it for us, tell the client nothing about internals.
        log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path,
                  exc_info=exc)
        return error_response(500, "internal_error", "internal server error")


def _core_handler(code: str):
    async def handler(_: Request, exc: Exception) -> JSONResponse:
        return error_response(STATUS[code], code, str(exc) or code)
    return handler
