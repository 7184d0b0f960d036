"""Access control (app/auth.py, clipsearch/keys.py): every route of the app × every kind of caller, the
page's session cookie, the failure limit, the loopback default, and that no key ever reaches a log.

The route table below must name every route the app has (walked from the app itself, OpenAPI schema
and page routes alike): a new route without an entry here fails `test_every_route_is_in_the_table`.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from clipsearch.keys import ApiKey, hash_key, write_keys_file

from app.auth import COOKIE, FailureLimiter
from app.main import create_app

KEYS = {"read": "reader-key-0123456789abcdef", "write": "writer-key-0123456789abcdef",
        "admin": "admin-key-0123456789abcdefgh"}
WRONG = "wrong-key-0123456789abcdefghij"
SECRETS = [*KEYS.values(), WRONG]
LOOPBACK = ("127.0.0.1", 50000)
REMOTE = ("203.0.113.7", 40000)
RED = "00_solid_red.png"

# (method, route template) -> the scope it needs; None: open to anyone.
ROUTES: dict[tuple[str, str], str | None] = {
    ("POST", "/search/text"): "read", ("POST", "/search/image"): "read", ("POST", "/search/similar"): "read",
    ("POST", "/search/vector"): "read", ("POST", "/search"): "read", ("POST", "/embed/text"): "read",
    ("POST", "/embed/image"): "read", ("GET", "/collections"): "read",
    ("GET", "/collections/{name}/items/{image_id:path}"): "read", ("GET", "/images/{image_id:path}"): "read",
    ("GET", "/thumbnails/{image_id:path}"): "read", ("GET", "/"): "read", ("GET", "/openapi.json"): "read",
    ("GET", "/docs"): "read", ("GET", "/redoc"): "read", ("GET", "/metrics"): "read",
    ("POST", "/collections/{name}/media"): "write", ("DELETE", "/collections/{name}/media/{image_id:path}"): "write",
    ("PUT", "/collections/{name}/media/{image_id:path}/captions"): "write",
    ("POST", "/collections/{name}/compact"): "admin", ("POST", "/admin/reload"): "admin",
    ("GET", "/healthz"): None, ("GET", "/readyz"): None, ("GET", "/static/{name}"): None,
    ("POST", "/auth/login"): None, ("POST", "/auth/logout"): None, ("GET", "/auth/session"): None,
}
RANK = {"read": 0, "write": 1, "admin": 2}
PARAMS = {"{name}": "test", "{image_id:path}": RED}
STATIC_PARAMS = {"/static/{name}": "/static/app.js"}


def app_routes(app) -> set[tuple[str, str]]:
    """Every (method, path template) the app routes, included routers flattened."""
    out = set()

    def walk(routes):
        for route in routes:
            if hasattr(route, "effective_route_contexts"):
                walk(route.effective_route_contexts())
            elif getattr(route, "methods", None):
                out.update((m, route.path) for m in route.methods if m != "HEAD")
    walk(app.routes)
    return out


@pytest.fixture(autouse=True)
def no_key_in_logs(caplog):
    """Nothing of a key in any log record of these tests (the messages and their arguments)."""
    caplog.set_level(logging.DEBUG)
    yield
    text = caplog.text + "".join(repr(r.args) for r in caplog.records)
    leaked = [s for s in SECRETS if s in text or s[:12] in text]
    assert not leaked, f"a key reached the logs: {leaked}"


@pytest.fixture
def keys_file(tmp_path) -> Path:
    path = tmp_path / "keys.txt"
    write_keys_file(path, [ApiKey(f"{scope}er", scope, hash_key(key)) for scope, key in KEYS.items()])
    return path


@pytest.fixture
def keyed(make_client, keys_file, dataset, fakes):
    """A client of a service with keys (reader/writer/admin), writes on; no key sent by default."""
    def make(**overrides):
        res = fakes.fake_resources(dataset)
        return make_client(resources=res, loader=lambda _: res, api_keys_file=keys_file, writes=True, **overrides)
    return make


def _auth(scope: str | None) -> dict[str, str]:
    return {} if scope is None else {"Authorization": f"Bearer {KEYS[scope]}"}


def _call(client: TestClient, method: str, template: str, headers: dict[str, str]):
    path = STATIC_PARAMS.get(template, template)
    for param, value in PARAMS.items():
        path = path.replace(param, value)
    body = {"json": {}} if method in ("POST", "PUT") else {}
    return client.request(method, path, headers=headers, **body)


def test_every_route_is_in_the_table(keyed):
    client = keyed()
    routes = app_routes(client.app)
    assert routes == set(ROUTES), f"new: {routes - set(ROUTES)}, gone: {set(ROUTES) - routes}"
    schema = client.get("/openapi.json", headers=_auth("read")).json()
    in_schema = {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops}
    templates = {(m, re.sub(r":path}", "}", p)) for m, p in routes}
    assert in_schema <= templates and len(in_schema) >= 20


@pytest.mark.parametrize("caller", ["none", "wrong", "read", "write", "admin"])
def test_route_walk(keyed, caller):
    """Every route × {no key, wrong key, read, write, admin}: 401 without a usable key, 403 below the
    route's scope, otherwise what the route itself answers (never 401/403/5xx)."""
    client = keyed(auth_failures_per_minute=1000)
    headers = {"none": {}, "wrong": {"X-API-Key": WRONG}}[caller] if caller in ("none", "wrong") else _auth(caller)
    seen = {}
    for (method, template), scope in sorted(ROUTES.items(), key=lambda kv: kv[0][1] == "/admin/reload"):
        r = _call(client, method, template, headers)
        seen[(method, template)] = r.status_code
        if scope is None:
            assert r.status_code not in (401, 403, 429) and r.status_code < 500, (method, template, r.text[:200])
        elif caller in ("none", "wrong"):
            assert r.status_code == 401, (method, template, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
        elif RANK[caller] < RANK[scope]:
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", (method, template)
            assert f"scope {caller}; this needs" in r.json()["error"]["message"]
        else:
            assert r.status_code not in (401, 403) and r.status_code < 500, (method, template, r.text[:200])
    if caller == "read":  # the reads answer for real
        assert all(seen[("GET", p)] == 200 for p in ("/collections", "/images/{image_id:path}", "/",
                                                     "/thumbnails/{image_id:path}", "/metrics", "/docs"))


def test_unmounted_routes_are_404_for_everyone(make_client, keys_file):
    client = make_client(api_keys_file=keys_file)  # writes off: the write routes do not exist
    for headers in ({}, _auth("admin")):
        assert client.post("/collections/test/media", headers=headers).status_code == 404
        assert client.post("/collections/test/compact", headers=headers).status_code == 404


def test_readyz_shows_details_only_to_readers(keyed):
    client = keyed()
    assert client.get("/readyz").json() == {"ready": True}
    assert client.get("/readyz", headers={"X-API-Key": WRONG}).json() == {"ready": True}
    full = client.get("/readyz", headers=_auth("read")).json()
    assert full["ready"] is True and full["collections"]["test"]["images"] == 12


def test_page_without_a_key_is_the_sign_in_page_with_401(keyed):
    client = keyed()
    r = client.get("/")
    assert r.status_code == 401 and "<form" in r.text and "signin" in r.text
    assert client.get("/static/app.js").status_code == 200  # the page's own code, no data


def test_metrics_public_switch(keyed):
    assert keyed().get("/metrics").status_code == 401
    assert keyed(metrics_public=True).get("/metrics").status_code == 200


def test_per_key_metrics_name_keys_never_show_them(keyed):
    client = keyed()
    for _ in range(3):
        assert client.post("/search/text", json={"query": "red"}, headers=_auth("read")).status_code == 200
    client.get("/collections", headers={"X-API-Key": WRONG})
    text = client.get("/metrics", headers=_auth("admin")).text
    assert re.search(r'^clipsearch_key_requests_total\{key="reader",scope="read"\} 3\.0$', text, re.M), text[-2000:]
    assert re.search(r'^clipsearch_auth_failures_total\{reason="invalid_key"\} 1\.0$', text, re.M)
    assert not any(s in text or hash_key(s) in text for s in SECRETS)


def test_cached_answers_are_not_a_way_around_the_key(keyed):
    client = keyed()
    body = {"query": "a red square", "k": 3}
    first = client.post("/search/text", json=body, headers=_auth("read"))
    assert first.status_code == 200
    assert client.post("/search/text", json=body, headers=_auth("read")).json()["cached"] is True
    for headers in ({}, {"X-API-Key": WRONG}):
        assert client.post("/search/text", json=body, headers=headers).status_code == 401


def test_x_api_key_and_bearer_both_work_and_compare_in_constant_time(keyed, monkeypatch):
    client = keyed()
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert client.get("/collections", headers={"X-API-Key": KEYS["read"]}).status_code == 200
    assert len(calls) == 3  # every stored hash compared, not only up to the match
    calls.clear()
    assert client.get("/collections", headers={"Authorization": f"bearer {KEYS['admin']}"}).status_code == 200
    assert len(calls) == 3
    calls.clear()
    assert client.get("/collections", headers={"X-API-Key": WRONG}).status_code == 401
    assert len(calls) == 3


# --- the page's session cookie ---------------------------------------------------------------------

def _login(client: TestClient, scope: str = "read"):
    return client.post("/auth/login", json={"key": KEYS[scope]}, headers={"Origin": "http://testserver"})


def test_cookie_opens_thumbnails_and_images(keyed):
    client = keyed()
    r = _login(client)
    assert r.status_code == 200 and r.json() == {"auth": "on", "signed_in": True, "name": "reader", "scope": "read"}
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Max-Age=43200" in cookie
    assert "Secure" not in cookie  # plain http and not told otherwise
    assert KEYS["read"] not in cookie and hash_key(KEYS["read"]) not in cookie
    assert client.get(f"/thumbnails/{RED}").status_code == 200
    assert client.get(f"/images/{RED}").status_code == 200
    assert client.get("/auth/session").json()["signed_in"] is True
    client.cookies.clear()
    assert client.get(f"/thumbnails/{RED}").status_code == 401
    assert client.get(f"/images/{RED}").status_code == 401


def test_cookie_secure_over_https_or_when_told(keyed):
    assert "Secure" in _login(keyed(cookie_secure=True)).headers["set-cookie"]
    client = keyed()
    https = TestClient(client.app, base_url="https://testserver", client=LOOPBACK)
    r = https.post("/auth/login", json={"key": KEYS["read"]}, headers={"Origin": "https://testserver"})
    assert "Secure" in r.headers["set-cookie"]


def test_logout_ends_the_session(keyed):
    client = keyed()
    _login(client)
    r = client.post("/auth/logout")
    assert r.status_code == 204 and 'clipsearch_session=""' in r.headers["set-cookie"]
    assert client.get(f"/thumbnails/{RED}").status_code == 401


def test_expired_or_tampered_cookie_is_refused(keyed):
    client = keyed()
    _login(client)
    token = client.cookies[COOKIE]
    auth = client.app.state.auth
    real_clock = auth.clock
    auth.clock = lambda: real_clock() + 12 * 3600 + 5
    assert client.get(f"/thumbnails/{RED}").status_code == 401
    auth.clock = real_clock
    assert client.get(f"/thumbnails/{RED}").status_code == 200
    body, mac = token.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=="))
    for forged in (
        base64.urlsafe_b64encode(json.dumps({**payload, "e": payload["e"] + 10**6}).encode()).decode().rstrip("=")
        + "." + mac,  # a later expiry, old signature
        body + "." + mac[:-2] + ("AA" if not mac.endswith("AA") else "BB"),  # a changed signature
        body, "garbage", "",
    ):
        client.cookies.clear()
        client.cookies.set(COOKIE, forged)
        r = client.get(f"/thumbnails/{RED}")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", forged


def test_a_session_cannot_outlive_its_key(keyed, keys_file):
    client = keyed()
    _login(client, "write")
    assert client.get(f"/images/{RED}").status_code == 200
    write_keys_file(keys_file, [ApiKey("reader", "read", hash_key(KEYS["read"]))])
    client.app.state.auth.reload_keys()  # what SIGHUP does (a changed mtime does it within a second)
    assert client.get(f"/images/{RED}").status_code == 401


def test_keys_file_changes_apply_without_a_restart(keyed, keys_file):
    client = keyed()
    client.app.state.auth.keyring.check_interval_s = 0
    new = "a-fresh-key-made-while-serving-0123"
    SECRETS.append(new)
    assert client.get("/collections", headers={"X-API-Key": new}).status_code == 401
    write_keys_file(keys_file, [ApiKey("late", "read", hash_key(new))])
    assert client.get("/collections", headers={"X-API-Key": new}).status_code == 200
    assert client.get("/collections", headers=_auth("read")).status_code == 401  # revoked
    keys_file.write_text("late:read:not-a-hash\n")  # broken while serving: the old keys stay
    assert client.get("/collections", headers={"X-API-Key": new}).status_code == 200


def test_cookie_writes_must_come_from_this_origin(keyed):
    client = keyed()
    _login(client, "write")
    body = {"query": "red"}
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {},
                    {"Origin": "null"}):
        r = client.post("/search/text", json=body, headers=headers)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", headers
    assert client.post("/search/text", json=body, headers={"Origin": "http://testserver"}).status_code == 200
    assert client.post("/search/text", json=body, headers={"Sec-Fetch-Site": "same-origin"}).status_code == 200
    assert client.get("/collections", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200  # a read
    evil = client.post("/auth/login", json={"key": KEYS["admin"]}, headers={"Origin": "https://evil.example"})
    assert evil.status_code == 403


def test_login_needs_a_right_key(keyed):
    client = keyed()
    r = client.post("/auth/login", json={"key": WRONG})
    assert r.status_code == 401 and "set-cookie" not in r.headers
    assert WRONG not in r.text


# --- failures slowed down ---------------------------------------------------------------------------

def test_wrong_keys_get_429_then_recover(keyed):
    client = keyed(auth_failures_per_minute=5)
    auth = client.app.state.auth
    now = [1_000_000.0]
    auth.clock = lambda: now[0]
    for _ in range(5):
        assert client.get("/collections", headers={"X-API-Key": WRONG}).status_code == 401
    r = client.get("/collections", headers={"X-API-Key": WRONG})
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_auth_failures"
    assert r.headers["retry-after"] == "60"
    assert client.get("/collections", headers=_auth("read")).status_code == 429  # even a right key, for now
    assert client.post("/auth/login", json={"key": KEYS["read"]}).status_code == 429
    assert client.get("/collections").status_code == 401  # no key: nothing to guess
    other = TestClient(client.app, client=("127.0.0.2", 1))
    assert other.get("/collections", headers=_auth("read")).status_code == 200  # another client
    now[0] += 30
    assert client.get("/collections", headers=_auth("read")).headers["retry-after"] == "30"
    now[0] += 31
    assert client.get("/collections", headers=_auth("read")).status_code == 200


def test_failure_limiter_memory_is_bounded():
    limiter = FailureLimiter(per_minute=3, max_clients=100)
    for i in range(5000):
        limiter.record(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(limiter) == 100
    for _ in range(3):
        limiter.record("192.0.2.1", 1.0)
    assert limiter.retry_after("192.0.2.1", 2.0) == 59 and limiter.retry_after("10.0.0.0", 2.0) is None


# --- without keys: loopback only; auth off ----------------------------------------------------------

def test_no_key_configured_answers_only_loopback(make_client, dataset, fakes):
    app = create_app(fakes.settings_for(Path("/nonexistent")), fakes.fake_resources(dataset))
    for peer in (LOOPBACK, ("::1", 1), ("::ffff:127.0.0.1", 1), ("127.8.9.10", 1)):
        with TestClient(app, client=peer) as c:
            assert c.post("/search/text", json={"query": "red"}).status_code == 200, peer
            assert c.get("/").status_code == 200
            assert c.get("/auth/session").json() == {"auth": "local", "signed_in": False, "name": None, "scope": None}
    for peer in (REMOTE, ("10.1.2.3", 1), ("192.168.1.20", 1), ("testclient", 1)):
        with TestClient(app, client=peer) as c:
            r = c.post("/search/text", json={"query": "red"})
            assert r.status_code == 403 and "API key" in r.json()["error"]["message"]
            assert "\n" not in r.json()["error"]["message"]
            assert c.get(f"/images/{RED}", headers=_auth("admin")).status_code == 403
            assert c.get("/healthz").status_code == 200
            assert c.get("/readyz").json() == {"ready": True}
    with TestClient(app, client=LOOPBACK) as c:
        assert c.post("/admin/reload").status_code == 404  # no key, no admin route


def test_auth_off_answers_everyone_and_says_so(dataset, fakes, caplog):
    app = create_app(fakes.settings_for(Path("/nonexistent"), auth="off", api_key=KEYS["admin"]),
                     fakes.fake_resources(dataset))
    with TestClient(app, client=REMOTE) as c:
        assert c.post("/search/text", json={"query": "red"}).status_code == 200
        assert c.get("/metrics").status_code == 200
    assert any(r.levelno == logging.WARNING and "ACCESS CONTROL IS OFF" in r.getMessage() for r in caplog.records)


def test_old_token_variables_are_keys_of_their_scope(make_client, dataset, fakes):
    write, admin = "old-write-token-0123456789", "old-admin-token-0123456789"
    SECRETS.extend([write, admin])
    res = fakes.fake_resources(dataset)
    client = make_client(resources=res, loader=lambda _: res, write_token=write, admin_token=admin)
    for token, scope in ((write, "write"), (admin, "admin")):
        h = {"Authorization": f"Bearer {token}"}
        assert client.get("/collections", headers=h).status_code == 200
        assert client.post("/admin/reload", headers=h).status_code == (202 if scope == "admin" else 403)
        assert client.delete("/collections/test/media/nope", headers=h).status_code == 404  # past auth
    text = client.get("/metrics", headers={"Authorization": f"Bearer {admin}"}).text
    assert 'key="env:write",scope="write"' in text and 'key="env:admin-token",scope="admin"' in text


def test_a_running_server_takes_new_keys_on_sighup(start_server, tmp_path, keys_file):
    import os
    import signal
    import time

    import httpx

    server = start_server("--fake", str(tmp_path / "data"), "--set", f"api_keys_file={keys_file}")
    assert server.wait_ready() == {"ready": True}  # no key: no details
    new = "a-key-added-while-running-0123456"
    SECRETS.append(new)
    url = server.url + "/collections"
    assert httpx.get(url, headers={"X-API-Key": new}).status_code == 401
    assert httpx.get(url, headers=_auth("read")).status_code == 200
    write_keys_file(keys_file, [ApiKey("added", "read", hash_key(new))])
    os.kill(server.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while httpx.get(url, headers={"X-API-Key": new}).status_code != 200:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    assert httpx.get(url, headers=_auth("read")).status_code == 401  # revoked
    log = server.log()
    assert not [s for s in SECRETS if s in log]
