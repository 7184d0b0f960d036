"""Schemathesis against the app's own OpenAPI schema: every generated request (valid and invalid)
gets a documented status with a body that matches the schema, and never a 5xx.

The app serves the deterministic fake encoder, so a request costs a millisecond or two; hypothesis
settings bound the examples per operation and the last test checks that at least
`MIN_REQUESTS` requests were actually sent across all operations.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from app.main import create_app

MIN_REQUESTS = 1000
TOKEN = "fuzz-token-0123456789abcdef"  # an admin key: every route is open to it (app/auth.py)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Operations with inputs get this many examples per generation mode (positive and negative); the
# input-less ones (/healthz, /readyz, /metrics) run once each, as hypothesis sees nothing to vary.
EXAMPLES = 330

SENT: Counter[str] = Counter()
STATUSES: Counter[tuple[str, int]] = Counter()
TIMING = {"start": None, "end": None}

# Anything that looks like a Python traceback or a path on this server has no place in a response.
LEAKS = re.compile(r"Traceback \(most recent call last\)|File \"/|/site-packages/|/usr/lib/python")


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory, dataset, fakes):
    tmp = tmp_path_factory.mktemp("fuzz")
    # the fuzzed POST /auth/login sends hundreds of wrong keys from one client: no failure limit here
    # (it has its own test, tests/app/test_app_auth.py)
    settings_ = fakes.settings_for(tmp, max_in_flight=64, admin_token=TOKEN, auth_failures_per_minute=10**6)
    app = create_app(settings_, fakes.fake_resources(dataset))
    yield app, [str(tmp), str(Path(dataset[0][0]["image_path"]).parent)]
    app.state.service.close_pool()


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    app, _ = fuzz_app
    return schemathesis.openapi.from_asgi("/openapi.json", app, headers=AUTH)


@pytest.fixture(scope="module")
def server_paths(fuzz_app):
    return fuzz_app[1]


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_fuzz_operation(case, server_paths):
    if TIMING["start"] is None:
        TIMING["start"] = time.perf_counter()
    if case.path == "/admin/reload":
        # A started reload would swap resources mid-run: no key (401); the key is not fuzzed either.
        case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
    else:
        case.headers = {**(case.headers or {}), **AUTH}
    response = case.call()
    SENT[f"{case.method} {case.path}"] += 1
    STATUSES[(f"{case.method} {case.path}", response.status_code)] += 1
    TIMING["end"] = time.perf_counter()
    text = response.text
    assert not LEAKS.search(text), text[:500]
    assert not any(p in text for p in server_paths), text[:500]
    excluded = []
    if response.status_code in (413, 422) and _beyond_the_schema(case.path, response.json()["error"]):
        excluded.append(positive_data_acceptance)
    case.validate_response(response, excluded_checks=excluded)


# What a JSON schema cannot say, per path: the 4xx a schema-valid request rightly gets.
IMAGE_PATHS = {"/search/image", "/embed/image", "/search"}
SEMANTIC_MESSAGES = re.compile(
    r"vector must have exactly|is a zero vector|cancel out|weights are all zero|no such item|"
    r"images of one query together")


def _beyond_the_schema(path: str, error: dict) -> bool:
    # The schema says "binary" or "a string", not "a decodable picture" or "base64 of one"; "a
    # string", not "JSON text of a filter object"; "numbers", not "as many as the collection's
    # dimension, not all zero"; "a string", not "an id the collection holds".
    if path in IMAGE_PATHS and error["code"] in ("invalid_image", "payload_too_large"):
        return True
    if path == "/search/image" and error["message"].startswith("filter must be"):
        return True
    return path in ("/search", "/search/vector") and bool(SEMANTIC_MESSAGES.search(error["message"]))


def test_known_ids_answer_as_documented(api_schema, dataset, fakes):
    """Random ids only reach the 404s; these are the 200s and 304s of the collection routes, checked
    against the same schema (status documented, body conforming)."""
    def check(path: str, method: str, send_headers: dict | None = None, **kw):
        case = api_schema[path][method].Case(**kw)
        response = case.call(headers={**AUTH, **(send_headers or {})})
        case.validate_response(response)
        return response

    image_ids = [r["image_id"] for r in dataset[0]]
    assert check("/collections", "GET").status_code == 200
    for image_id in image_ids[:4]:
        assert check("/collections/{name}/items/{image_id}", "GET",
                     path_parameters={"name": "test", "image_id": image_id}).status_code == 200
        assert check("/images/{image_id}", "GET", path_parameters={"image_id": image_id}).status_code == 200
        thumb = check("/thumbnails/{image_id}", "GET", path_parameters={"image_id": image_id},
                      query={"collection": "test"})
        assert thumb.status_code == 200
        assert check("/thumbnails/{image_id}", "GET", path_parameters={"image_id": image_id},
                     send_headers={"If-None-Match": thumb.headers["etag"][0]}).status_code == 304
        similar = check("/search/similar", "POST", media_type="application/json",
                        body={"image_id": image_id, "k": 3, "offset": 1, "filter": {"kind": ["solid", "stripes"]}})
        assert similar.status_code == 200 and similar.json()["results"]
    text = check("/search/text", "POST", media_type="application/json",
                 body={"query": "red", "collection": "test", "offset": 2, "min_score": -1, "filter": {"index": 3}})
    assert text.status_code == 200
    data = fakes.png_bytes(fakes.image("solid", "red"))
    for target in ("images", "captions"):
        r = check("/search/image", "POST", media_type="multipart/form-data",
                  body={"file": data, "target": target, "k": 3, "filter": '{"kind": "solid"}'})
        assert r.status_code == 200 and r.json()["results"], r.text


def test_fuzz_sent_enough_requests():
    total = sum(SENT.values())
    elapsed = (TIMING["end"] or 0) - (TIMING["start"] or 0)
    print(f"\nfuzz: {total} requests in {elapsed:.1f} s; by operation {dict(SENT)}; "
          f"statuses {sorted(STATUSES.items())}")
    assert total >= MIN_REQUESTS, dict(SENT)
    assert all(status < 500 for _, status in STATUSES)
