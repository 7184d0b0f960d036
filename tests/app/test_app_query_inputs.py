"""The query inputs beyond text and multipart uploads, through the app with the fake encoder:
JSON images (base64, data: URIs, URLs), query vectors, weighted mixed terms, and embeddings out.

Expected results are computed from the fake encoder's own vectors and the store's exact search, so
every assertion names exact ids and numbers.
"""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
from PIL import Image

from app.inputs import MAX_TERMS

RED_RGB = (220, 20, 30)  # the fake dataset's "red" (tests/app/conftest.py PALETTE)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def red() -> Image.Image:
    return Image.new("RGB", (32, 32), RED_RGB)


def ids(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [hit["image_id"] for hit in response.json()["results"]]


def error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["code"] == code, body
    return body["message"]


def expected_ids(client, vec: np.ndarray, k: int, exclude: tuple[str, ...] = ()) -> list[str]:
    store = client.app.state.service.resources.store()
    return [h.image_id for h in store.search(np.asarray(vec, np.float32), k, exclude=exclude)]


RED = png_bytes(red())
RED_B64 = base64.b64encode(RED).decode()


# --- images in JSON ------------------------------------------------------------------------------

@pytest.mark.parametrize("image", [RED_B64, "data:image/png;base64," + RED_B64,
                                   base64.urlsafe_b64encode(RED).decode().rstrip("="),
                                   "\n".join(RED_B64[i:i + 76] for i in range(0, len(RED_B64), 76))])
def test_json_image_equals_the_upload(client, encoder, image: str):
    upload = client.post("/search/image", files={"file": ("red.png", RED, "image/png")}, data={"k": "4"})
    r = client.post("/search/image", json={"image": image, "k": 4})
    assert ids(r) == ids(upload)
    want = encoder.encode_images([red()])[0]
    assert ids(r) == expected_ids(client, want, 4)
    assert r.json()["target"] == "images"


def test_json_image_captions_target_collection_and_filter(client):
    r = client.post("/search/image", json={"image": RED_B64, "k": 3, "target": "captions", "collection": "test"})
    assert r.status_code == 200 and r.json()["target"] == "captions"
    assert r.json()["results"][0]["image_id"] == "00_solid_red.png"
    r = client.post("/search/image", json={"image": RED_B64, "k": 5, "filter": {"kind": "stripes"}})
    assert ids(r) and all("stripes" in i for i in ids(r))


def test_json_image_shares_the_cache_with_uploads(client):
    first = client.post("/search/image", json={"image": RED_B64, "k": 2})
    assert first.json()["cached"] is False
    again = client.post("/search/image", files={"file": ("r.png", RED, "image/png")}, data={"k": "2"})
    assert again.json()["cached"] is True and ids(again) == ids(first)


@pytest.mark.parametrize("body,status,code", [
    ({"image": "not base64 at all!"}, 422, "invalid_image"),
    ({"image": "QUJD"}, 422, "invalid_image"),  # valid base64 of "ABC": not an image
    ({"image": "data:text/plain;base64,QUJD"}, 422, "invalid_image"),
    ({"image": "data:image/png,QUJD"}, 422, "invalid_image"),
    ({"image": RED_B64, "image_url": "http://example.com/a.png"}, 422, "invalid_request"),
    ({"k": 3}, 422, "invalid_request"),
    ({"image": None}, 422, "invalid_request"),
    ({"image": RED_B64, "k": 0}, 422, "invalid_request"),
    ({"image": RED_B64, "file": "x"}, 422, "invalid_request"),
])
def test_json_image_refusals(client, body: dict, status: int, code: str):
    error(client.post("/search/image", json=body), status, code)


def test_json_image_over_the_cap(make_client):
    client = make_client(max_upload_bytes=4096)
    big = base64.b64encode(b"\x89PNG" + bytes(5000)).decode()
    assert "4,096-byte" in error(client.post("/search/image", json={"image": big}), 413, "payload_too_large")


def test_json_image_bomb_is_refused(make_client):
    client = make_client(max_image_pixels=64 * 64)
    data = png_bytes(Image.new("RGB", (200, 200), (255, 0, 0)))
    error(client.post("/search/image", json={"image": base64.b64encode(data).decode()}), 422, "invalid_image")


def test_other_content_types_still_415(client):
    r = client.post("/search/image", content=b"abc", headers={"content-type": "text/plain"})
    assert "multipart/form-data or application/json" in error(r, 415, "unsupported_media_type")


def test_openapi_documents_both_bodies(client):
    op = client.get("/openapi.json").json()["paths"]["/search/image"]["post"]
    content = op["requestBody"]["content"]
    assert set(content) == {"multipart/form-data", "application/json"}
    schema = content["application/json"]["schema"]
    assert {"image", "image_url", "k", "target", "collection"} <= set(schema["properties"])
    assert schema["oneOf"] == [{"required": ["image"]}, {"required": ["image_url"]}]
    assert schema["examples"]


# --- image URLs ----------------------------------------------------------------------------------

class _Images(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/red.png":
            self._reply(200, RED, "image/png")
        elif self.path == "/to-other-loopback":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.2:{self.server.server_port}/red.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/big":
            self._reply(200, bytes(10_000), "image/png")
        else:
            self._reply(404, b"", "text/plain")

    def _reply(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def image_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_image_url_fetched_when_enabled(make_client, image_server: str):
    client = make_client(fetch_urls=True, fetch_allowed_private_networks=["127.0.0.1/32"])
    r = client.post("/search/image", json={"image_url": f"http://{image_server}/red.png", "k": 4})
    upload = client.post("/search/image", files={"file": ("red.png", RED, "image/png")}, data={"k": "4"})
    assert ids(r) == ids(upload)
    assert r.headers["server-timing"].startswith("fetch;dur=")
    e = client.post("/embed/image", json={"image_url": f"http://{image_server}/red.png"})
    assert e.status_code == 200 and len(e.json()["embeddings"]) == 1


def test_image_url_refusals(make_client, image_server: str):
    host, port = image_server.split(":")
    off = make_client()
    error(off.post("/search/image", json={"image_url": f"http://{image_server}/red.png"}), 403, "fetch_disabled")
    on = make_client(fetch_urls=True)  # public addresses only
    for url in (f"http://{image_server}/red.png", f"http://localhost:{port}/red.png",  # a name -> loopback
                f"http://[::1]:{port}/red.png", f"http://2130706433:{port}/red.png",
                "http://169.254.169.254/latest/meta-data/"):
        error(on.post("/search/image", json={"image_url": url}), 403, "url_forbidden")
    error(on.post("/search/image", json={"image_url": "ftp://example.com/a.png"}), 400, "bad_url")
    error(on.post("/search/image", json={"image_url": f"http://user@{image_server}/red.png"}), 400, "bad_url")
    local = make_client(fetch_urls=True, fetch_allowed_private_networks=["127.0.0.1/32"], max_upload_bytes=4096)
    # admitted 127.0.0.1 redirecting to another loopback address: refused at the hop
    error(local.post("/search/image", json={"image_url": f"http://{image_server}/to-other-loopback"}),
          403, "url_forbidden")
    error(local.post("/search/image", json={"image_url": f"http://{image_server}/big"}), 413, "payload_too_large")
    error(local.post("/search/image", json={"image_url": f"http://{image_server}/missing"}), 502, "fetch_failed")
    allow = make_client(fetch_urls=True, fetch_allowed_private_networks=["127.0.0.1/32"],
                        fetch_allowlist=["images.example.com"])
    error(allow.post("/search/image", json={"image_url": f"http://{image_server}/red.png"}), 403, "url_forbidden")


# --- vectors in ----------------------------------------------------------------------------------

def test_vector_search_equals_text_search(client, encoder):
    vec = encoder.text_vector("blue")
    by_text = client.post("/search/text", json={"query": "blue", "k": 5})
    r = client.post("/search/vector", json={"vector": (vec * 3.5).tolist(), "k": 5})  # scale does not matter
    assert ids(r) == ids(by_text) == expected_ids(client, vec, 5)
    scores = [h["score"] for h in r.json()["results"]]
    assert scores == pytest.approx([h["score"] for h in by_text.json()["results"]], abs=1e-6)


def test_vector_search_captions_and_pagination(client, encoder):
    vec = encoder.text_vector("green").tolist()
    r = client.post("/search/vector", json={"vector": vec, "target": "captions", "k": 2})
    assert r.status_code == 200 and r.json()["target"] == "captions" and len(r.json()["results"]) == 2
    page1 = ids(client.post("/search/vector", json={"vector": vec, "k": 3}))
    page2 = ids(client.post("/search/vector", json={"vector": vec, "k": 3, "offset": 3}))
    assert page1 + page2 == expected_ids(client, np.asarray(vec), 6)


@pytest.mark.parametrize("vector,message", [
    ([0.1] * 15, "exactly 16 numbers, got 15"),
    ([0.1] * 17, "exactly 16 numbers, got 17"),
    ([0.0] * 16, "zero vector"),
    ([1e-300] * 16, "zero vector"),
])
def test_vector_refusals(client, vector: list[float], message: str):
    assert message in error(client.post("/search/vector", json={"vector": vector}), 422, "invalid_request")


@pytest.mark.parametrize("raw", [b'{"vector": [NaN' + b", 0.1" * 15 + b"]}",
                                 b'{"vector": [Infinity' + b", 0.1" * 15 + b"]}",
                                 b'{"vector": ["0.1"' + b", 0.1" * 15 + b"]}",
                                 b'{"vector": [true' + b", 0.1" * 15 + b"]}",
                                 b'{"vector": []}'])
def test_vector_non_numbers(client, raw: bytes):
    r = client.post("/search/vector", content=raw, headers={"content-type": "application/json"})
    error(r, 422, "invalid_request")


# --- weighted and mixed terms --------------------------------------------------------------------

def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def test_weighted_text_terms(client, encoder):
    terms = [{"text": "red", "weight": 1.0}, {"text": "white", "weight": -0.5}]
    want = _unit(_unit(encoder.text_vector("red")) - 0.5 * _unit(encoder.text_vector("white")))
    r = client.post("/search", json={"terms": terms, "k": 6})
    assert ids(r) == expected_ids(client, want, 6)
    # the white-and-red stripes fall behind plain red and away from the top when white is negative
    plus = ids(client.post("/search", json={"terms": [terms[0], {"text": "white", "weight": 1.0}], "k": 6}))
    assert plus != ids(r) and plus.index("10_stripes_red_white.png") < ids(r).index("10_stripes_red_white.png")


def test_mixed_terms_image_id_and_uploaded_image(client, encoder):
    store = client.app.state.service.resources.store()
    item = "01_solid_green.png"
    terms = [{"image_id": item, "weight": 1.0}, {"text": "yellow", "weight": 0.7},
             {"image": RED_B64, "weight": 0.3}]
    want = _unit(_unit(store.vector(item)) + 0.7 * _unit(encoder.text_vector("yellow"))
                 + 0.3 * _unit(encoder.encode_images([red()])[0]))
    r = client.post("/search", json={"terms": terms, "k": 5})
    assert ids(r) == expected_ids(client, want, 5, exclude=(item,))
    assert item not in ids(r)  # the query's own item is left out, as in /search/similar
    r = client.post("/search", json={"terms": terms, "k": 3, "target": "captions"})
    assert r.status_code == 200 and r.json()["target"] == "captions"


def test_terms_cache_key_covers_every_term(client):
    base = [{"text": "red", "weight": 1.0}, {"text": "blue", "weight": 0.5}]
    assert client.post("/search", json={"terms": base}).json()["cached"] is False
    assert client.post("/search", json={"terms": base}).json()["cached"] is True
    for changed in ([base[0], {"text": "blue", "weight": 0.6}], [base[0], {"text": "green", "weight": 0.5}],
                    [base[0]], [base[0], {"image": RED_B64, "weight": 0.5}],
                    [base[0], {"image_id": "02_solid_blue.png", "weight": 0.5}]):
        r = client.post("/search", json={"terms": changed})
        assert r.json()["cached"] is False, changed


@pytest.mark.parametrize("terms,status,code,message", [
    ([{"text": "red", "weight": 0}, {"text": "blue", "weight": 0.0}], 422, "invalid_request", "all zero"),
    ([{"text": "red", "weight": 1}, {"text": "red", "weight": -1}], 422, "invalid_request", "cancel out"),
    ([{"image_id": "no-such.png"}], 422, "invalid_request", "terms[0].image_id: no such item"),
    ([{"text": "red"}] * (MAX_TERMS + 1), 422, "invalid_request", "at most 16"),
    ([], 422, "invalid_request", "at least 1"),
    ([{"text": "red", "image_id": "01_solid_green.png"}], 422, "invalid_request", "exactly one"),
    ([{"weight": 1}], 422, "invalid_request", "exactly one"),
    ([{"text": "   "}], 422, "invalid_request", "empty"),
    ([{"image": "%%%"}], 422, "invalid_image", "base64"),
    ([{"image": "QUJD"}], 422, "invalid_image", "terms[0].image"),
    ([{"text": "red", "weight": "1"}], 422, "invalid_request", "weight"),
    ([{"text": "red", "weight": 1e6}], 422, "invalid_request", "weight"),
])
def test_terms_refusals(client, terms: list, status: int, code: str, message: str):
    assert message in error(client.post("/search", json={"terms": terms}), status, code)


def test_terms_refused_before_encoding(client, encoder):
    before = encoder.text_calls
    client.post("/search", json={"terms": [{"text": "red", "weight": 0}]})
    client.post("/search", json={"terms": [{"text": "red"}] * (MAX_TERMS + 1)})
    assert encoder.text_calls == before


def test_terms_images_share_one_cap(make_client):
    client = make_client(max_upload_bytes=1024)
    noise = np.random.default_rng(0).integers(0, 256, (14, 14, 3), dtype=np.uint8)
    data = png_bytes(Image.fromarray(noise))
    assert 512 < len(data) <= 1024  # each fits alone, two do not
    one = base64.b64encode(data).decode()
    assert client.post("/search", json={"terms": [{"image": one}]}).status_code == 200
    error(client.post("/search", json={"terms": [{"image": one}, {"image": one}]}), 413, "payload_too_large")


# --- embeddings out ------------------------------------------------------------------------------

def test_embed_text(client, encoder):
    r = client.post("/embed/text", json={"texts": ["red", "  a   blue  thing "]})
    assert r.status_code == 200
    body = r.json()
    assert body["dim"] == encoder.dim and body["model"]["model"] == "fake-color"
    got = np.asarray(body["embeddings"], np.float32)
    want = encoder.encode_texts(["red", "a blue thing"])  # normalised as a query is
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_embed_text_batches_and_cap(make_client, encoder):
    client = make_client(encoder=encoder, max_embed_texts=5, text_batch_size=2)
    texts = ["red", "green", "blue", "white", "black"]
    before = encoder.text_calls
    got = np.asarray(client.post("/embed/text", json={"texts": texts}).json()["embeddings"])
    assert encoder.text_calls - before == 3  # 2 + 2 + 1
    np.testing.assert_allclose(got, encoder.encode_texts(texts), atol=1e-6)
    error(client.post("/embed/text", json={"texts": texts + ["pink"]}), 422, "invalid_request")
    error(client.post("/embed/text", json={"texts": []}), 422, "invalid_request")
    error(client.post("/embed/text", json={"texts": ["red", " "]}), 422, "invalid_request")


def test_embed_image_upload_and_json_agree(client, encoder):
    up = client.post("/embed/image", files={"file": ("red.png", RED, "image/png")})
    js = client.post("/embed/image", json={"image": "data:image/png;base64," + RED_B64})
    assert up.status_code == js.status_code == 200
    want = encoder.encode_images([red()])
    np.testing.assert_allclose(up.json()["embeddings"], want, atol=1e-6)
    assert up.json()["embeddings"] == js.json()["embeddings"]
    # the vector it returns finds what the image search finds
    r = client.post("/search/vector", json={"vector": up.json()["embeddings"][0], "k": 4})
    assert ids(r) == ids(client.post("/search/image", json={"image": RED_B64, "k": 4}))


def test_embed_image_refusals(make_client):
    client = make_client(max_upload_bytes=2048)
    error(client.post("/embed/image", files={"file": ("x.png", b"not an image", "image/png")}), 422, "invalid_image")
    error(client.post("/embed/image", files={"file": ("x.png", b"", "image/png")}), 422, "invalid_image")
    error(client.post("/embed/image", files={"file": ("x.png", bytes(3000), "image/png")}), 413, "payload_too_large")
    error(client.post("/embed/image", json={"image": "@@@"}), 422, "invalid_image")
    error(client.post("/embed/image", json={"image_url": "http://example.com/a.png"}), 403, "fetch_disabled")
    error(client.post("/embed/image", content=b"x", headers={"content-type": "text/plain"}), 415,
          "unsupported_media_type")


def test_new_routes_wait_for_readiness(make_client):
    client = make_client(resources=None, loader=lambda s: (_ for _ in ()).throw(RuntimeError("nope")))
    for path, body in (("/search/vector", {"vector": [1.0]}), ("/search", {"terms": [{"text": "red"}]}),
                       ("/embed/text", {"texts": ["red"]}), ("/search/image", {"image": RED_B64})):
        assert client.post(path, json=body).status_code == 503, path


def test_new_routes_are_metered(client, encoder):
    client.post("/search/vector", json={"vector": encoder.text_vector("red").tolist()})
    client.post("/search", json={"terms": [{"text": "red"}]})
    client.post("/embed/text", json={"texts": ["red"]})
    metrics = client.get("/metrics").text
    for endpoint in ("vector", "terms", "embed_text"):
        assert f'clipsearch_stage_seconds_count{{endpoint="{endpoint}",stage="total"}} 1.0' in metrics, endpoint
