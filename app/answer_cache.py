"""Repeated text searches answered from their raw request bytes, before routing (pure ASGI).

A cache hit inside the handler costs ~0.04 ms, but the request still pays FastAPI's body parsing,
the request model's validation and normalisation and the dependency checks before it gets there.
This middleware keys a `POST /search/text` on what determines its answer before any of that: the
path, the Content-Type header and the body bytes exactly, plus the served index version. A request
seen before gets the stored answer at once (`"cached": true`, its own `took_ms` and
`Server-Timing: cache;desc=hit, total;dur=...`, the same metrics a hit in the handler records); any
other request goes on to the route as usual, its body replayed, and a 200 answer is remembered.

What is and is not looked up here:
- only bodies that declare a Content-Length of at most `max_body` bytes (JSON queries are small;
  anything else, chunked bodies included, goes straight on, and the body caps stay where they are);
- entries live in the service's own `ResponseCache` (same LRU, same size, cleared on every reload,
  none when `CLIPSEARCH_CACHE_SIZE=0`), under keys that start with "raw";
- a hit is answered only to a request that may read (`allow`, app.auth.cache_gate); any other goes
  on to the route, whose access check answers it;
- two spellings of one query (" red" and "red") are two entries here and one in the handler's
  cache; the handler's normalisation still decides what is the same query.

The middleware sits innermost (inside admission and the body caps), so everything outside it —
request metrics, admission control, CORS and any header middleware — sees a hit like any answer.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.state import ServiceState

# the tail every search answer ends with (`app.routes.search._search_response`)
_TAIL = re.compile(rb'"took_ms": -?[0-9.eE+-]+, "cached": (?:true|false)\}$')
_DROP = {b"content-length", b"server-timing"}


class CachedAnswerMiddleware:
    def __init__(self, app: ASGIApp, state: ServiceState, paths: Iterable[str] = ("/search/text",),
                 max_body: int = 16 * 1024, endpoint_of: dict[str, str] | None = None,
                 allow: Callable[[HTTPConnection], bool] | None = None):
        self.app = app
        self.allow = allow  # access control (app.auth.cache_gate): a request it refuses is never a hit
        self.state = state
        self.paths = frozenset(paths)
        self.max_body = max_body
        self.endpoint_of = dict(endpoint_of or {"/search/text": "text"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.paths
                or self.state.cache.maxsize <= 0):
            await self.app(scope, receive, send)
            return
        res = self.state.resources
        declared, ctype = _headers(scope)
        if res is None or declared is None or declared > self.max_body:
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        messages: list[Message] = []
        body = b""
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # a disconnect: let the app see it as it would have
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        key = ("raw", scope["path"], ctype, body, res.version)
        stored = self.state.cache.get(key)
        if stored is not None and (self.allow is None or self.allow(HTTPConnection(scope))):
            await self._answer(stored, scope, send, t0)
            return

        replay = iter(messages)

        async def replayed() -> Message:
            message = next(replay, None)
            return message if message is not None else await receive()

        start: Message | None = None
        parts: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body" and start is not None and start["status"] == 200:
                parts.append(message.get("body", b""))
                if not message.get("more_body", False):
                    self._remember(key, start, b"".join(parts))
            await send(message)

        await self.app(scope, replayed, capture)

    def _remember(self, key: tuple, start: Message, body: bytes) -> None:
        tail = _TAIL.search(body)
        if tail is None:
            return  # not a search answer this middleware knows how to re-date
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in _DROP]
        self.state.cache.put(key, (headers, body[:tail.start()]))

    async def _answer(self, stored: tuple, scope: Scope, send: Send, t0: float) -> None:
        headers, prefix = stored
        endpoint = self.endpoint_of.get(scope["path"], "text")
        metrics = self.state.metrics
        metrics.cache_hits.labels(endpoint).inc()
        took = time.perf_counter() - t0
        metrics.observe_stages(endpoint, {"total": took})
        body = prefix + b'"took_ms": %s, "cached": true}' % repr(round(took * 1000, 3)).encode()
        timing = b"cache;desc=hit, total;dur=%.3f" % (took * 1000)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*headers, (b"content-length", str(len(body)).encode()),
                                (b"server-timing", timing)]})
        await send({"type": "http.response.body", "body": body})


def _headers(scope: Scope) -> tuple[int | None, bytes]:
    declared, ctype = None, b""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                return None, b""
        elif name == b"content-type":
            ctype = value
    return declared, ctype
