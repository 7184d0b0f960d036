"""POST /search/text and /search/image against the real app with the deterministic fake encoder."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


def _expected(query_vec: np.ndarray, vecs: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    scores = vecs @ query_vec
    order = np.argsort(-scores, kind="stable")[:k]
    return order.tolist(), scores[order].tolist()


def test_text_search_exact_ranking(client, dataset, fakes):
    images, texts = dataset
    enc = fakes.ColorEncoder()
    img_vecs = enc.encode_images([Image.open(r["image_path"]) for r in images])
    r = client.post("/search/text", json={"query": "  something   red  ", "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"results", "k", "offset", "collection", "took_ms", "cached"}
    assert body["k"] == 5 and body["cached"] is False and body["took_ms"] >= 0
    assert body["offset"] == 0 and body["collection"] == "test"
    rows, scores = _expected(enc.text_vector("something red"), img_vecs, 5)
    assert [h["image_id"] for h in body["results"]] == [images[i]["image_id"] for i in rows]
    assert [h["score"] for h in body["results"]] == pytest.approx(scores, abs=1e-5)
    assert [h["rank"] for h in body["results"]] == [1, 2, 3, 4, 5]
    top = body["results"][0]
    # the plain red square and the red-and-white stripes are the only red images
    assert {h["image_id"] for h in body["results"][:2]} == {"00_solid_red.png", "10_stripes_red_white.png"}
    assert set(top) == {"image_id", "score", "rank", "image_url", "thumbnail_url", "captions", "metadata"}
    assert top["image_url"] == f"/images/{top['image_id']}"  # the default collection: no ?collection=
    assert top["thumbnail_url"] == f"/thumbnails/{top['image_id']}"
    assert top["captions"] == [t["caption"] for t in texts if t["image_id"] == top["image_id"]]
    assert top["metadata"] == {"kind": "solid", "index": 0}


def test_text_search_default_k_and_k_larger_than_index(client, dataset):
    r = client.post("/search/text", json={"query": "blue"})
    assert r.status_code == 200 and len(r.json()["results"]) == 10 and r.json()["k"] == 10
    r = client.post("/search/text", json={"query": "blue", "k": 100})
    assert r.status_code == 200
    assert len(r.json()["results"]) == len(dataset[0])  # 12 images: all of them, once each
    assert len({h["image_id"] for h in r.json()["results"]}) == len(dataset[0])


def test_image_search_exact_ranking(client, dataset, fakes):
    """target=images (the default): similar images, each once, ranked exactly as brute force."""
    images, _ = dataset
    enc = fakes.ColorEncoder()
    img_vecs = enc.encode_images([Image.open(r["image_path"]) for r in images])
    upload = fakes.image("checkerboard", "black", "white")  # not one of the collection's images
    r = client.post("/search/image", files={"file": ("query.png", fakes.png_bytes(upload), "image/png")},
                    data={"k": "5"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"results", "target", "k", "offset", "collection", "took_ms", "cached"}
    assert body["target"] == "images" and body["k"] == 5 and body["cached"] is False
    assert body["offset"] == 0 and body["collection"] == "test"
    rows, scores = _expected(enc.image_vector(upload), img_vecs, 5)
    assert [h["image_id"] for h in body["results"]] == [images[i]["image_id"] for i in rows]
    assert [h["score"] for h in body["results"]] == pytest.approx(scores, abs=1e-5)
    assert [h["rank"] for h in body["results"]] == [1, 2, 3, 4, 5]
    assert set(body["results"][0]) == {"image_id", "score", "rank", "image_url", "thumbnail_url", "captions",
                                       "metadata"}
    # black and white: the black square, the white square, the black/yellow checkerboard, the red/white stripes
    assert {h["image_id"] for h in body["results"][:2]} == {"07_solid_black.png", "06_solid_white.png"}
    # all of them: each image exactly once
    every = client.post("/search/image", files={"file": ("query.png", fakes.png_bytes(upload), "image/png")},
                        data={"k": "100"}).json()["results"]
    assert sorted(h["image_id"] for h in every) == sorted(r["image_id"] for r in images)


def test_image_to_caption_search_exact_ranking(client, dataset, fakes):
    images, texts = dataset
    enc = fakes.ColorEncoder()
    txt_vecs = enc.encode_texts([t["caption"] for t in texts])
    upload = fakes.image("checkerboard", "brown", "teal")
    data = fakes.png_bytes(upload)
    r = client.post("/search/image", files={"file": ("query.png", data, "image/png")},
                    data={"k": "4", "target": "captions"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["k"] == 4 and body["cached"] is False and body["target"] == "captions"
    rows, scores = _expected(enc.image_vector(upload), txt_vecs, 4)
    assert [h["caption_id"] for h in body["results"]] == [texts[i]["caption_id"] for i in rows]
    assert [h["caption"] for h in body["results"]] == [texts[i]["caption"] for i in rows]
    assert [h["score"] for h in body["results"]] == pytest.approx(scores, abs=1e-5)
    assert [h["rank"] for h in body["results"]] == [1, 2, 3, 4]
    assert set(body["results"][0]) == {"caption_id", "caption", "image_id", "score", "cosine", "rank",
                                       "image_url", "thumbnail_url"}
    # no hubness correction in this collection: the ranking score is the cosine
    assert [h["cosine"] for h in body["results"]] == pytest.approx(scores, abs=1e-5)
    # the three captions of the brown/teal checkerboard come first
    assert {h["image_id"] for h in body["results"][:3]} == {"09_checkerboard_brown_teal.png"}
    top = body["results"][0]
    assert top["image_url"] == "/images/09_checkerboard_brown_teal.png"
    assert top["thumbnail_url"] == "/thumbnails/09_checkerboard_brown_teal.png"
    assert client.get(top["image_url"]).status_code == 200


def test_image_search_accepts_jpeg_and_default_k(client, fakes):
    data = fakes.png_bytes(fakes.image("solid", "orange"), "JPEG")
    r = client.post("/search/image", files={"file": ("q.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["k"] == 10 and len(body["results"]) == 10
    assert body["results"][0]["image_id"] == "05_solid_orange.png"


def _counter(text: str, name: str, endpoint: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'{name}{{endpoint="{endpoint}"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{endpoint={endpoint}}} not in metrics")


def test_text_cache_hit_and_miss(client, encoder):
    first = client.post("/search/text", json={"query": "green", "k": 3}).json()
    again = client.post("/search/text", json={"query": "  green ", "k": 3}).json()  # same after trim
    assert first["cached"] is False and again["cached"] is True
    assert again["results"] == first["results"]
    assert encoder.text_calls == 1
    other_k = client.post("/search/text", json={"query": "green", "k": 4}).json()
    assert other_k["cached"] is False and encoder.text_calls == 2
    other_case = client.post("/search/text", json={"query": "Green", "k": 3}).json()
    assert other_case["cached"] is False  # case is the tokenizer's business, not the cache's
    metrics = client.get("/metrics").text
    assert _counter(metrics, "clipsearch_cache_hits_total", "text") == 1
    assert _counter(metrics, "clipsearch_cache_misses_total", "text") == 3


def test_image_cache_by_bytes(client, encoder, fakes):
    data = fakes.png_bytes(fakes.image("solid", "blue"))
    files = {"file": ("a.png", data, "image/png")}
    assert client.post("/search/image", files=files, data={"k": "3"}).json()["cached"] is False
    hit = client.post("/search/image", files={"file": ("renamed.png", data, "image/png")}, data={"k": "3"})
    assert hit.json()["cached"] is True
    assert client.post("/search/image", files=files, data={"k": "2"}).json()["cached"] is False
    assert encoder.image_calls == 2
    metrics = client.get("/metrics").text
    assert _counter(metrics, "clipsearch_cache_hits_total", "image") == 1
    assert _counter(metrics, "clipsearch_cache_misses_total", "image") == 2


def test_cache_disabled(make_client, encoder):
    client = make_client(encoder=encoder, cache_size=0)
    for _ in range(2):
        assert client.post("/search/text", json={"query": "red"}).json()["cached"] is False
    assert encoder.text_calls == 2


def test_settings_limits_shape_validation(make_client):
    client = make_client(max_k=5, default_k=3, max_query_chars=10)
    assert client.post("/search/text", json={"query": "red"}).json()["k"] == 3
    assert client.post("/search/text", json={"query": "red", "k": 6}).status_code == 422
    assert client.post("/search/text", json={"query": "x" * 11}).status_code == 422
    schema = client.get("/openapi.json").json()["components"]["schemas"]["TextSearchRequest"]
    assert schema["properties"]["k"]["maximum"] == 5
    assert schema["properties"]["query"]["maxLength"] == 10


def _server_timing(response) -> dict[str, str]:
    out = {}
    for part in response.headers["server-timing"].split(","):
        name, *params = (p.strip() for p in part.split(";"))
        out[name] = dict(p.split("=", 1) for p in params)
    return out


def test_server_timing_header_names_stages_then_cache(client):
    miss = _server_timing(client.post("/search/text", json={"query": "magenta", "k": 2}))
    assert {"encode", "search", "total"} <= set(miss) and "cache" not in miss
    assert 0 <= float(miss["encode"]["dur"]) <= float(miss["total"]["dur"])
    hit = _server_timing(client.post("/search/text", json={"query": "magenta", "k": 2}))
    assert hit["cache"] == {"desc": "hit"} and "encode" not in hit and float(hit["total"]["dur"]) >= 0


def test_image_search_ranks_by_hubness_corrected_score(make_client, dataset, fakes):
    """A caption index with row offsets (the hubness correction) ranks captions by cosine + offset,
    reports both numbers, and /readyz says which correction is served."""
    images, texts = dataset
    enc = fakes.ColorEncoder()
    txt_vecs = enc.encode_texts([t["caption"] for t in texts])
    upload = fakes.image("checkerboard", "brown", "teal")
    cos = txt_vecs @ enc.image_vector(upload)
    # penalise the query's best caption hard enough to move it down, as a hub would be
    offsets = np.zeros(len(texts), np.float32)
    top = int(np.argmax(cos))
    offsets[top] = -1.0
    hub = {"beta": 0.5, "k": 10, "bank_split": "train", "bank_count": 7, "selected_on": "val"}
    client = make_client(resources=fakes.fake_resources(dataset, caption_offsets=offsets, hubness=hub))
    r = client.post("/search/image", files={"file": ("q.png", fakes.png_bytes(upload), "image/png")},
                    data={"k": str(len(texts)), "target": "captions"})
    assert r.status_code == 200, r.text
    hits = r.json()["results"]
    assert len(hits) == len(texts)
    expected = np.argsort(-(cos + offsets), kind="stable")
    assert [h["caption_id"] for h in hits] == [texts[i]["caption_id"] for i in expected[:len(hits)]]
    assert hits[0]["caption_id"] != texts[top]["caption_id"]
    by_id = {t["caption_id"]: i for i, t in enumerate(texts)}
    for h in hits:
        i = by_id[h["caption_id"]]
        assert h["cosine"] == pytest.approx(float(cos[i]), abs=1e-5)
        assert h["score"] == pytest.approx(float(cos[i] + offsets[i]), abs=1e-5)
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert client.get("/readyz").json()["hubness"] == hub
    assert client.get("/collections").json()["collections"][0]["hubness"] == hub
    # image -> image search has no caption offsets: plain cosine ranking, each image once
    img = client.post("/search/image", files={"file": ("q.png", fakes.png_bytes(upload), "image/png")},
                      data={"k": "3"}).json()["results"]
    assert img[0]["image_id"] == "09_checkerboard_brown_teal.png"
