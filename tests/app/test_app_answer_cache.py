"""The raw-body answer cache (app/answer_cache.py): a repeated /search/text body is answered before
routing and validation, with the same results, metrics and headers as a hit in the handler; nothing
else is ever answered from it."""

import json

from starlette.testclient import TestClient


def _counter(text: str, name: str, endpoint: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'{name}{{endpoint="{endpoint}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _post(client: TestClient, body: bytes, ctype: str = "application/json"):
    return client.post("/search/text", content=body, headers={"content-type": ctype})


def test_repeated_body_is_answered_from_the_raw_cache(client, encoder):
    body = json.dumps({"query": "green", "k": 3}).encode()
    first = _post(client, body)
    second = _post(client, body)
    assert first.status_code == second.status_code == 200
    a, b = first.json(), second.json()
    assert a["cached"] is False and b["cached"] is True
    assert b["results"] == a["results"] and b["k"] == 3 and b["collection"] == a["collection"]
    assert isinstance(b["took_ms"], float) and b["took_ms"] >= 0
    assert set(b) == set(a)
    assert second.headers["content-type"] == "application/json"
    assert second.headers["server-timing"].startswith("cache;desc=hit, total;dur=")
    assert int(second.headers["content-length"]) == len(second.content)
    assert encoder.text_calls == 1
    metrics = client.get("/metrics").text
    assert _counter(metrics, "clipsearch_cache_hits_total", "text") == 1
    assert 'clipsearch_http_requests_total{method="POST",route="/search/text",status="200"} 2.0' in metrics
    assert 'clipsearch_stage_seconds_count{endpoint="text",stage="total"} 2.0' in metrics


def test_other_spellings_still_meet_in_the_handler_cache(client, encoder):
    assert _post(client, b'{"query": "green", "k": 3}').json()["cached"] is False
    spaced = _post(client, b'{"k": 3, "query": "  green "}').json()
    assert spaced["cached"] is True and encoder.text_calls == 1


def test_errors_are_never_stored_and_content_type_is_part_of_the_key(client, encoder):
    bad = b'{"query": "", "k": 3}'
    assert [_post(client, bad).status_code for _ in range(2)] == [422, 422]
    unknown = b'{"query": "red", "collection": "nope"}'
    assert [_post(client, unknown).status_code for _ in range(2)] == [404, 404]
    good = b'{"query": "red", "k": 2}'
    assert _post(client, good).status_code == 200
    assert _post(client, good, ctype="text/plain").status_code == 415  # never served from the cache
    assert _post(client, good).json()["cached"] is True


def test_a_reload_clears_it(client, encoder):
    body = b'{"query": "blue", "k": 2}'
    _post(client, body)
    assert _post(client, body).json()["cached"] is True
    state = client.app.state.service
    state.set_ready(state.resources)  # what a reload does once the new resources are loaded
    assert _post(client, body).json()["cached"] is False
    assert encoder.text_calls == 2


def test_cache_off_means_off(make_client, encoder):
    client = make_client(encoder=encoder, cache_size=0)
    body = b'{"query": "blue", "k": 2}'
    assert [_post(client, body).json()["cached"] for _ in range(2)] == [False, False]
    assert encoder.text_calls == 2


def test_chunked_or_large_bodies_go_to_the_route(client, encoder):
    body = b'{"query": "blue", "k": 2}'

    def chunks():
        yield body

    for _ in range(2):
        r = client.post("/search/text", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 200
    assert r.json()["cached"] is True  # the handler's cache, reached through the route
    assert not any(k[0] == "raw" for k in client.app.state.service.cache._lru.keys())
