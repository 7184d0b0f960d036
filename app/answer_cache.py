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
- entries live in the engine's `ResponseCache` (same LRU, same size, cleared on every reload,
  none when `CLIPSEARCH_CACHE_SIZE=0`), under keys that start with "raw";
- a hit is answered only to a request that may read (`allow`, app.auth.cache_gate); any other goes
  on to the route, whose access check answers it;
- what is stored is what the route handed over (`offer_answer`: the results' JSON and the answer's
  other fields), never bytes parsed back out of a response: a hit is assembled by the same
  `answer_body` the route uses, with its own `took_ms`;
- two spellings of one query (" red" and "red") are two entries here and one in the handler's
  cache; the handler's normalisation still decides what is the same query.

The middleware sits innermost (inside admission and the body caps), so everything outside it —
request metrics, admission control, CORS and any header middleware — sees a hit like any answer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.engine import Engine

_DROP = {b"content-length", b"server-timing"}
_SLOT = "clipsearch.answer"  # the ASGI scope key through which a route hands its answer over


def answer_body(results_json: bytes, fields: Mapping[str, Any], took: float, cached: bool) -> bytes:
    """A search answer's JSON: `{"results": [...], <fields>, "took_ms": ..., "cached": ...}`."""
    tail = json.dumps({**fields, "took_ms": round(took * 1000, 3), "cached": cached})
    return b'{"results":' + results_json + b"," + tail[1:].encode()


def offer_answer(scope: Scope, results_json: bytes, fields: Mapping[str, Any]) -> None:
    """Hand a search answer's parts to the raw answer cache, where it waits for this request."""
    slot = scope.get(_SLOT)
    if slot is not None:
        slot["answer"] = (results_json, dict(fields))


class CachedAnswerMiddleware:
    def __init__(self, app: ASGIApp, engine: Engine, paths: Iterable[str] = ("/search/text",),
                 max_body: int = 16 * 1024, endpoint_of: dict[str, str] | None = None,
                 allow: Callable[[HTTPConnection], bool] | None = None):
        self.app = app
        self.allow = allow  # access control (app.auth.cache_gate): a request it refuses is never a hit
        self.engine = engine
        self.paths = frozenset(paths)
        self.max_body = max_body
        self.endpoint_of = dict(endpoint_of or {"/search/text": "text"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.paths
                or self.engine.cache.maxsize <= 0):
            await self.app(scope, receive, send)
            return
        res = self.engine.resources
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
        stored = self.engine.cache.get(key)
        if stored is not None and (self.allow is None or self.allow(HTTPConnection(scope))):
            await self._answer(stored, scope, send, t0)
            return

        replay = iter(messages)

        async def replayed() -> Message:
            message = next(replay, None)
            return message if message is not None else await receive()

        slot: dict[str, Any] = {}
        scope[_SLOT] = slot

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer = slot.get("answer")
                if message["status"] == 200 and answer is not None:
                    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in _DROP]
                    self.engine.cache.put(key, (headers, *answer))
            await send(message)

        await self.app(scope, replayed, capture)

    async def _answer(self, stored: tuple, scope: Scope, send: Send, t0: float) -> None:
        headers, results_json, fields = stored
        endpoint = self.endpoint_of.get(scope["path"], "text")
        metrics = self.engine.metrics
        metrics.cache_hits.labels(endpoint).inc()
        took = time.perf_counter() - t0
        metrics.observe_stages(endpoint, {"total": took})
        body = answer_body(results_json, fields, took, cached=True)
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
