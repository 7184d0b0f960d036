"""Access control: one dependency, `require(scope)`, applied per router in app/main.py.

A request is authorised by, in order:
- `CLIPSEARCH_AUTH=off`: nobody is asked for anything (a trusted network; logged loudly at start-up);
- no key configured at all: loopback clients get everything, anyone else 403 with a one-line hint;
- a key in `Authorization: Bearer KEY` or `X-API-Key: KEY`, looked up in the `KeyRing`
  (clipsearch/keys.py: hashes only, constant-time comparison);
- the search page's session cookie (`POST /auth/login` with a key): an HMAC-signed record of the key's
  name, a prefix of its hash and an expiry. A revoked or replaced key ends its sessions. A
  cookie-authorised POST/PUT/PATCH/DELETE must come from this origin (`Origin` / `Sec-Fetch-Site`).

401 + `WWW-Authenticate: Bearer` when no usable key came (or a wrong one), 403 when the key lacks
the scope, 429 + Retry-After once one client sent `auth_failures_per_minute` wrong keys in a minute.
Keys never reach a log line, a metrics label or an error message; key names do.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.requests import HTTPConnection

from clipsearch.keys import RANK, ApiKey, KeyRing, check_scope, client_is_loopback, env_keys

from app.config import Settings
from app.errors import ApiError, Unauthorized
from app.schemas import ErrorResponse

log = logging.getLogger("app.auth")

COOKIE = "clipsearch_session"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
WINDOW_S = 60.0
MAX_TRACKED_CLIENTS = 10_000
LOCAL_ONLY_HINT = ("this service answers only this machine until an API key is configured: run `python -m "
                   "offline keys add NAME --scope read --file keys.txt` and set CLIPSEARCH_API_KEYS_FILE "
                   "(docs/security.md)")
AUTH_HEADERS = {"WWW-Authenticate": "Bearer"}


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class TooManyFailures(ApiError):
    status, code = 429, "too_many_auth_failures"


# Added to every protected router's OpenAPI responses, so clients (and the schema fuzzing) know them.
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "No API key, or a wrong one (Authorization: Bearer KEY or X-API-Key)"},
    403: {"model": ErrorResponse, "description": "The key lacks this route's scope, or a non-loopback client of "
                                                 "a service with no key configured"},
    429: {"model": ErrorResponse, "description": "Too many wrong keys from this client; retry after Retry-After"},
}


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: a key's name and scope (`loopback` / `anonymous` without keys)."""

    name: str
    scope: str
    via: str  # "key", "cookie", "loopback", "off"

    def allows(self, scope: str) -> bool:
        return RANK[self.scope] >= RANK[scope]


class FailureLimiter:
    """Wrong keys per client in the last minute, for at most MAX_TRACKED_CLIENTS clients (the least
    recently failing are forgotten first), so a flood of addresses cannot grow memory without bound."""

    def __init__(self, per_minute: int, max_clients: int = MAX_TRACKED_CLIENTS):
        self.per_minute = per_minute
        self.max_clients = max_clients
        self._fails: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, client: str, now: float) -> int | None:
        """Seconds until `client` may try a key again, or None if it may now."""
        with self._lock:
            fails = self._fails.get(client)
            if fails is None or len(fails) < self.per_minute:
                return None
            wait = WINDOW_S - (now - fails[0])
            return math.ceil(wait) if wait > 0 else None

    def record(self, client: str, now: float) -> int:
        with self._lock:
            fails = self._fails.pop(client, None) or deque(maxlen=self.per_minute)
            while fails and now - fails[0] >= WINDOW_S:
                fails.popleft()
            fails.append(now)
            self._fails[client] = fails
            while len(self._fails) > self.max_clients:
                self._fails.popitem(last=False)
            return len(fails)

    def __len__(self) -> int:
        return len(self._fails)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionSigner:
    """`payload.mac`: base64url JSON {n: key name, k: first 16 hex of its hash, e: expiry (unix s)} and
    its HMAC-SHA256 under the server secret."""

    def __init__(self, secret: bytes):
        self._secret = secret

    def _mac(self, body: str) -> str:
        return _b64(hmac.new(self._secret, body.encode("ascii"), hashlib.sha256).digest())

    def issue(self, key: ApiKey, expires: float) -> str:
        body = _b64(json.dumps({"n": key.name, "k": key.digest[:16], "e": int(expires)},
                               separators=(",", ":")).encode())
        return f"{body}.{self._mac(body)}"

    def verify(self, token: str, now: float) -> tuple[str, dict[str, Any] | None]:
        """("ok", payload), ("expired", None) or ("tampered", None)."""
        body, _, mac = token.partition(".")
        try:
            expected = self._mac(body)
        except UnicodeEncodeError:
            return "tampered", None
        if not mac or not hmac.compare_digest(mac.encode("ascii", "replace"), expected.encode("ascii")):
            return "tampered", None
        try:
            payload = json.loads(_unb64(body))
            expiry = float(payload["e"])
            str(payload["n"]), str(payload["k"])
        except (ValueError, KeyError, TypeError):
            return "tampered", None
        if expiry <= now:
            return "expired", None
        return "ok", payload


def _presented_key(conn: HTTPConnection) -> str | None:
    scheme, _, value = conn.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    value = conn.headers.get("x-api-key", "").strip()
    return value or None


def _client(conn: HTTPConnection) -> str:
    return conn.client.host if conn.client is not None else "local"


def same_origin(conn: HTTPConnection) -> bool:
    """A browser request from this origin: `Sec-Fetch-Site: same-origin` (or `none`: typed in), or an
    `Origin` whose host:port is this request's Host. Neither header present is refused (every browser
    sends Origin with a POST)."""
    site = conn.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = conn.headers.get("origin")
    if origin is not None:
        host = conn.headers.get("host", "")
        return origin != "null" and bool(host) and urlsplit(origin).netloc.lower() == host.lower()
    return site is not None


class Denied(Exception):
    def __init__(self, error: ApiError, reason: str, counted: bool = False):
        self.error, self.reason, self.counted = error, reason, counted


class Authenticator:
    def __init__(self, settings: Settings, metrics: Any | None = None, clock: Callable[[], float] = time.time):
        self.settings = settings
        fixed = {"CLIPSEARCH_API_KEY": settings.api_key, "CLIPSEARCH_ADMIN_TOKEN": settings.admin_token,
                 "CLIPSEARCH_WRITE_TOKEN": settings.write_token}
        self.keyring = KeyRing(env_keys({k: v.get_secret_value() for k, v in fixed.items() if v is not None}),
                               settings.api_keys_file)
        self.off = settings.auth == "off"
        secret = settings.session_secret
        self.signer = SessionSigner(secret.get_secret_value().encode() if secret else secrets.token_bytes(32))
        self.limiter = FailureLimiter(settings.auth_failures_per_minute)
        self.metrics = metrics
        self.clock = clock

    @property
    def configured(self) -> bool:
        return self.keyring.configured

    def announce(self) -> None:
        if self.off:
            log.warning("ACCESS CONTROL IS OFF (CLIPSEARCH_AUTH=off): anyone who can reach this port can "
                        "search, download%s every image. Use this on a trusted network only.",
                        ", change" if self.settings.writes_enabled else "")
        elif not self.configured:
            log.info("no API key configured: answering loopback clients only (docs/security.md)")
        else:
            log.info("access control on: %d key(s)%s", len(self.keyring.keys),
                     f" ({self.keyring.path.name} re-read when it changes)" if self.keyring.path else "")

    def reload_keys(self) -> None:
        """SIGHUP: re-read the keys file now."""
        if self.keyring.path is not None:
            self._log_reread(self.keyring.reload())

    def _log_reread(self, ok: bool) -> None:
        if ok:
            log.info("keys file re-read: %d key(s)", len(self.keyring.keys))
        else:
            log.error("keys file not taken, the keys read before stay in force: %s", self.keyring.error)

    # -- the decision -------------------------------------------------------------------------------

    def _resolve(self, conn: HTTPConnection, scope: str) -> Principal:
        if self.off:
            return Principal("anonymous", "admin", "off")
        if not self.keyring.configured:
            if client_is_loopback(conn.client.host if conn.client else None):
                return Principal("loopback", "admin", "loopback")
            raise Denied(Forbidden(LOCAL_ONLY_HINT), "not_local")
        reread = self.keyring.maybe_reload(time.monotonic())
        if reread is not None:
            self._log_reread(reread)
        key = _presented_key(conn)
        cookie = conn.cookies.get(COOKIE) if key is None else None
        if key is None and not cookie:
            raise Denied(Unauthorized("an API key is required: send Authorization: Bearer KEY or X-API-Key: KEY",
                                      headers=AUTH_HEADERS), "missing")
        now = self.clock()
        wait = self.limiter.retry_after(_client(conn), now)
        if wait is not None:
            raise Denied(TooManyFailures(f"too many wrong keys from this client; retry in {wait} s",
                                         headers={"Retry-After": str(wait)}), "rate_limited")
        if key is not None:
            found = self.keyring.find(key)
            if found is None:
                raise Denied(Unauthorized("invalid API key", headers=AUTH_HEADERS), "invalid_key", counted=True)
            principal = Principal(found.name, found.scope, "key")
        else:
            principal = self._from_cookie(conn, cookie, now)  # type: ignore[arg-type]
        if not principal.allows(scope):
            raise Denied(Forbidden(f"the key {principal.name!r} has scope {principal.scope}; this needs {scope}"),
                         "scope")
        return principal

    def _from_cookie(self, conn: HTTPConnection, cookie: str, now: float) -> Principal:
        status, payload = self.signer.verify(cookie, now)
        if payload is None:
            raise Denied(Unauthorized("the session is expired or invalid; sign in again", headers=AUTH_HEADERS),
                         f"cookie_{status}", counted=status == "tampered")
        key = self.keyring.get(payload["n"])
        if key is None or not hmac.compare_digest(key.digest[:16].encode(), str(payload["k"]).encode()):
            raise Denied(Unauthorized("the session's key was revoked or replaced; sign in again",
                                      headers=AUTH_HEADERS), "cookie_revoked")
        if conn.scope.get("method") in UNSAFE_METHODS and not same_origin(conn):
            raise Denied(Forbidden("a cookie-authorised request must come from this site's own page"),
                         "cross_site")
        return Principal(key.name, key.scope, "cookie")

    def check(self, conn: HTTPConnection, scope: str) -> Principal:
        """The request's principal for `scope`, or the ApiError to answer (failures counted)."""
        try:
            principal = self._resolve(conn, scope)
        except Denied as denied:
            if self.metrics is not None:
                self.metrics.auth_failures.labels(denied.reason).inc()
            if denied.counted:
                client = _client(conn)
                n = self.limiter.record(client, self.clock())
                log.warning("refused a %s from %s (%d in the last minute)",
                            "wrong API key" if denied.reason == "invalid_key" else "tampered session cookie",
                            client, n)
            raise denied.error from None
        self._count(principal)
        return principal

    def peek(self, conn: HTTPConnection, scope: str, count: bool = False) -> Principal | None:
        """The principal if the request may use `scope`, else None; nothing recorded against the client."""
        try:
            principal = self._resolve(conn, scope)
        except Denied:
            return None
        if count:
            self._count(principal)
        return principal

    def _count(self, principal: Principal) -> None:
        if self.metrics is not None:
            self.metrics.key_requests.labels(principal.name, principal.scope).inc()

    # -- sessions -----------------------------------------------------------------------------------

    def login(self, conn: HTTPConnection, presented: str) -> tuple[ApiKey, float]:
        if self.off or not self.keyring.configured:
            raise ApiError("no API key is configured here: the page works without signing in")
        if conn.headers.get("origin") is not None and not same_origin(conn):
            raise Forbidden("sign in from this site's own page")
        client, now = _client(conn), self.clock()
        wait = self.limiter.retry_after(client, now)
        if wait is not None:
            raise TooManyFailures(f"too many wrong keys from this client; retry in {wait} s",
                                  headers={"Retry-After": str(wait)})
        found = self.keyring.find(presented)
        if found is None:
            n = self.limiter.record(client, now)
            if self.metrics is not None:
                self.metrics.auth_failures.labels("invalid_key").inc()
            log.warning("refused a wrong API key at sign-in from %s (%d in the last minute)", client, n)
            raise Unauthorized("invalid API key", headers=AUTH_HEADERS)
        return found, now + self.settings.session_hours * 3600

    def set_cookie(self, response: Response, conn: HTTPConnection, key: ApiKey, expires: float) -> None:
        response.set_cookie(COOKIE, self.signer.issue(key, expires), max_age=round(expires - self.clock()),
                            path="/", httponly=True, samesite="strict",
                            secure=self.settings.cookie_secure or conn.url.scheme == "https")


def get_auth(conn: HTTPConnection) -> Authenticator:
    return conn.app.state.auth


def require(scope: str) -> Callable[[Request], Principal]:
    """A dependency that lets the request through with at least `scope`, or answers 401/403/429."""
    check_scope(scope)

    # async: a hash, a few compare_digest calls and at most one stat a second; not worth a thread hop
    async def dependency(request: Request) -> Principal:
        return get_auth(request).check(request, scope)

    dependency.__name__ = f"require_{scope}"
    return dependency


async def metrics_access(request: Request) -> None:
    """/metrics: open with CLIPSEARCH_METRICS_PUBLIC=1, else scope read."""
    auth = get_auth(request)
    if not auth.settings.metrics_public:
        auth.check(request, "read")


def may(conn: HTTPConnection, scope: str) -> bool:
    """Whether this request could use `scope` (for answers that show more to authorised callers)."""
    return get_auth(conn).peek(conn, scope) is not None


def cache_gate(conn: HTTPConnection) -> bool:
    """For the raw answer cache, which answers before routing: a hit only for a request allowed to read
    (counted as an authorised request); anything else goes on to the route, which answers it."""
    return get_auth(conn).peek(conn, "read", count=True) is not None


class LoginRequest(BaseModel):
    key: str = Field(min_length=1, max_length=512)


class SessionResponse(BaseModel):
    auth: str = Field(description="on (keys), off (CLIPSEARCH_AUTH=off) or local (no key configured: loopback only)")
    signed_in: bool = Field(description="A session cookie of a key in force came with the request")
    name: str | None = None
    scope: str | None = None


def build_router(app: FastAPI) -> APIRouter:
    """POST /auth/login, POST /auth/logout, GET /auth/session (open), and the API docs (scope read)."""
    router = APIRouter(tags=["auth"])

    @router.post("/auth/login", response_model=SessionResponse,
                 responses={**AUTH_RESPONSES, 400: {"model": ErrorResponse, "description": "No keys configured"}},
                 summary="Sign the search page in with a key: answers a signed session cookie")
    async def login(body: LoginRequest, request: Request) -> Response:
        auth = get_auth(request)
        key, expires = auth.login(request, body.key)
        response = JSONResponse(SessionResponse(auth="on", signed_in=True, name=key.name,
                                                scope=key.scope).model_dump())
        auth.set_cookie(response, request, key, expires)
        return response

    @router.post("/auth/logout", status_code=204, response_class=Response, summary="End the page's session")
    async def logout() -> Response:
        response = Response(status_code=204)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    @router.get("/auth/session", response_model=SessionResponse, summary="Whether the page is signed in")
    async def session(request: Request) -> SessionResponse:
        auth = get_auth(request)
        mode = "off" if auth.off else ("on" if auth.configured else "local")
        who = auth.peek(request, "read") if request.cookies.get(COOKIE) and mode == "on" else None
        return SessionResponse(auth=mode, signed_in=who is not None and who.via == "cookie",
                               name=who.name if who else None, scope=who.scope if who else None)

    docs = APIRouter(include_in_schema=False, dependencies=[Depends(require("read"))])

    @docs.get("/openapi.json")
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @docs.get("/docs")
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

    @docs.get("/redoc")
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")

    router.include_router(docs)
    return router
