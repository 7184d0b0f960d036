"""/healthz, /readyz, /metrics, /docs, admission control (429) and the catch-all 500."""

from __future__ import annotations

import re
import threading
import time

from fastapi.testclient import TestClient


def wait_ready_state(client: TestClient, loading_prefix: str = "loading", timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        r = client.get("/readyz")
        if r.status_code == 200 or not r.json()["reason"].startswith(loading_prefix):
            return r
        assert time.monotonic() < deadline, "resources never finished loading"
        time.sleep(0.02)


def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_ready_with_resources(client, dataset):
    r = client.get("/readyz")
    assert r.status_code == 200
    body = r.json()
    assert body["ready"] is True and body["model"]["model"] == "fake-color"
    assert body["images"] == len(dataset[0]) and body["captions"] == len(dataset[1])
    assert re.fullmatch(r"[0-9a-f]{16}", body["index_version"])


def test_readyz_503_until_loaded_then_200(make_client, dataset, fakes):
    gate = threading.Event()

    def slow_loader(settings):
        assert gate.wait(10)
        return fakes.fake_resources(dataset)

    client = make_client(loader=slow_loader)
    # while the model "loads", the process answers: alive, not ready, searches get 503 with the reason
    assert client.get("/healthz").status_code == 200
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["ready"] is False
    assert r.json()["reason"].startswith("loading")
    assert r.headers["retry-after"]
    s = client.post("/search/text", json={"query": "red"})
    assert s.status_code == 503 and s.json()["error"]["code"] == "not_ready"
    assert s.json()["error"]["message"].startswith("loading")
    assert client.get("/images/00_solid_red.png").status_code == 503
    assert "clipsearch_ready 0.0" in client.get("/metrics").text
    gate.set()
    r = wait_ready_state(client)
    assert r.status_code == 200 and r.json()["ready"] is True
    assert client.post("/search/text", json={"query": "red"}).status_code == 200
    assert "clipsearch_ready 1.0" in client.get("/metrics").text


def test_unexpected_load_failure_is_one_line_reason(make_client, caplog):
    def exploding_loader(settings):
        raise KeyError("images")

    with caplog.at_level("DEBUG", logger="app"):
        client = make_client(loader=exploding_loader)
        r = wait_ready_state(client)
    assert r.status_code == 503
    assert r.json()["reason"] == "unexpected KeyError while loading resources: 'images'"
    errors = [rec for rec in caplog.records if rec.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None


def test_metrics_content(client, dataset):
    assert client.post("/search/text", json={"query": "red", "k": 3}).status_code == 200
    assert client.post("/search/text", json={"query": "red", "k": 3}).status_code == 200
    assert client.post("/search/text", json={"query": ""}).status_code == 422
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for stage in ("encode", "search", "total"):
        assert f'clipsearch_stage_seconds_count{{endpoint="text",stage="{stage}"}}' in text
    assert 'clipsearch_stage_seconds_count{endpoint="text",stage="total"} 2.0' in text
    assert 'clipsearch_stage_seconds_count{endpoint="text",stage="encode"} 1.0' in text
    assert 'clipsearch_cache_hits_total{endpoint="text"} 1.0' in text
    assert 'clipsearch_cache_misses_total{endpoint="text"} 1.0' in text
    assert f'clipsearch_index_size{{index="images"}} {len(dataset[0])}.0' in text
    assert f'clipsearch_index_size{{index="texts"}} {len(dataset[1])}.0' in text
    assert re.search(r'clipsearch_model_info\{[^}]*model="fake-color"', text)
    assert 'clipsearch_http_requests_total{method="POST",route="/search/text",status="200"} 2.0' in text
    assert 'clipsearch_http_requests_total{method="POST",route="/search/text",status="422"} 1.0' in text


def test_metrics_image_stages_and_route_templates(client, fakes):
    data = fakes.png_bytes(fakes.image("solid", "red"))
    assert client.post("/search/image", files={"file": ("a.png", data, "image/png")}).status_code == 200
    client.get("/images/00_solid_red.png")
    client.get("/images/does-not-exist.png")
    client.get("/no/such/route")
    text = client.get("/metrics").text
    for stage in ("decode", "encode", "search", "total"):
        assert f'clipsearch_stage_seconds_count{{endpoint="image",stage="{stage}"}} 1.0' in text
    assert 'route="/images/{image_id:path}",status="200"' in text
    assert 'route="/images/{image_id:path}",status="404"' in text
    assert 'route="unmatched",status="404"' in text
    assert "does-not-exist" not in text


def test_two_apps_in_one_process_keep_separate_metrics(make_client):
    a, b = make_client(), make_client()
    a.post("/search/text", json={"query": "red"})
    assert 'clipsearch_cache_misses_total{endpoint="text"} 1.0' in a.get("/metrics").text
    assert 'clipsearch_cache_misses_total{endpoint="text"} 0.0' in b.get("/metrics").text


def test_openapi_docs(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/search/text", "/search/image", "/images/{image_id}", "/healthz", "/readyz",
            "/metrics"} <= set(spec["paths"])
    form = spec["paths"]["/search/image"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in form


def test_overload_answers_429_fast(make_client, fakes):
    enc = fakes.GatedEncoder()
    client = make_client(encoder=enc, max_in_flight=1, retry_after_s=2)
    results = {}

    def held_request():
        results["held"] = client.post("/search/text", json={"query": "red"})

    thread = threading.Thread(target=held_request)
    thread.start()
    try:
        assert enc.entered.wait(10)
        t0 = time.perf_counter()
        r = client.post("/search/text", json={"query": "blue"})
        elapsed = time.perf_counter() - t0
        assert r.status_code == 429 and r.json()["error"]["code"] == "overloaded"
        assert r.headers["retry-after"] == "2"
        assert elapsed < 1.0
        img = client.post("/search/image", files={"file": ("a.png", b"x", "image/png")})
        assert img.status_code == 429
        # ops endpoints are never throttled
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
    finally:
        enc.release.set()
        thread.join(10)
    assert results["held"].status_code == 200
    assert client.post("/search/text", json={"query": "blue"}).status_code == 200  # slot released
    text = client.get("/metrics").text
    assert 'clipsearch_rejected_requests_total{endpoint="text"} 1.0' in text
    assert 'route="/search/text",status="429"' in text


def test_unexpected_error_is_generic_500(make_client, fakes):
    client = make_client(encoder=fakes.BrokenEncoder(), raise_server_exceptions=False)
    r = client.post("/search/text", json={"query": "red"})
    assert r.status_code == 500
    assert r.json() == {"error": {"code": "internal_error", "message": "internal server error"}}
    assert "secret" not in r.text and "/srv" not in r.text
    # the limiter slot was released despite the failure
    assert client.get("/healthz").status_code == 200
    assert client.app.state.service.limiter.count == 0


def test_cors_off_by_default_and_on_when_configured(make_client):
    plain = make_client()
    r = plain.get("/healthz", headers={"Origin": "http://ui.example"})
    assert "access-control-allow-origin" not in r.headers
    cors = make_client(cors_origins="http://ui.example, http://other.example")
    r = cors.get("/healthz", headers={"Origin": "http://ui.example"})
    assert r.headers["access-control-allow-origin"] == "http://ui.example"
