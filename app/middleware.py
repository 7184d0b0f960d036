"""Pure ASGI middleware: request counting, admission control for searches, request body caps."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_response
from app.engine import Engine


class AdmissionMiddleware:
    """Admit at most `max_in_flight` searches; answer the next one 429 at once, before its body is read.

    Queueing would only turn overload into timeouts for everyone; a fast 429 with Retry-After lets a
    load balancer or client back off.
    """

    def __init__(self, app: ASGIApp, engine: Engine, paths: Mapping[str, str]):
        self.app = app
        self.engine = engine
        self.paths = dict(paths)  # path -> endpoint label

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.paths.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        limiter, metrics = self.engine.limiter, self.engine.metrics
        if not limiter.try_acquire():
            metrics.rejected.labels(endpoint).inc()
            response = error_response(
                429, "overloaded", f"server busy: {limiter.limit} searches in flight; retry shortly",
                headers={"Retry-After": str(self.engine.settings.retry_after_s)})
            await response(scope, receive, send)
            return
        metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            metrics.in_flight.dec()
            limiter.release()


class RequestMetricsMiddleware:
    """Count requests by route template (not raw path, which would explode label cardinality)."""

    def __init__(self, app: ASGIApp, engine: Engine, static_paths: frozenset[str]):
        """`static_paths`: paths counted under their own name even when answered before routing
        (the admission 429s); anything else unrouted counts as "unmatched"."""
        self.app = app
        self.engine = engine
        self.static_paths = static_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None)
            if route is None:
                route = scope["path"] if scope["path"] in self.static_paths else "unmatched"
            self.engine.metrics.requests.labels(route, scope["method"], str(status)).inc()


class BodyTooLarge(HTTPException):
    # An HTTPException so FastAPI's body parsing re-raises it as is instead of answering 400.
    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than {limit} bytes")


class BodyLimitMiddleware:
    """Cap request bodies per path: by Content-Length before reading anything, and by counting the
    bytes as they arrive (chunked uploads, lying headers). Starlette's own limiter would replace our
    JSON error with plain text, hence this one."""

    def __init__(self, app: ASGIApp, limits: Mapping[str, int], default: int,
                 patterns: Sequence[tuple[re.Pattern[str], int]] = ()):
        self.app = app
        self.limits = dict(limits)
        self.default = default
        self.patterns = list(patterns)  # (path regex, limit) for paths with parameters (uploads)

    def _limit(self, path: str) -> int:
        limit = self.limits.get(path)
        if limit is not None:
            return limit
        for pattern, cap in self.patterns:
            if pattern.fullmatch(path):
                return cap
        return self.default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            exc = BodyTooLarge(limit)
            await error_response(413, "payload_too_large", exc.detail,
                                 headers={"Connection": "close"})(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
