"""Every malformed request gets a 4xx in the one error shape, never a 5xx."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
from PIL import Image


def assert_error(r, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"]["code"], str) and isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    if code:
        assert body["error"]["code"] == code
    return body["error"]


@pytest.mark.parametrize("payload", [
    {"query": ""},
    {"query": "   \n\t "},
    {"query": "x" * 1001},
    {"query": "red", "k": 0},
    {"query": "red", "k": 101},
    {"query": "red", "k": "5"},
    {"query": "red", "k": 2.5},
    {"query": "red", "k": True},
    {"query": "red", "k": None},
    {"k": 5},
    {"query": None},
    {"query": ["red"]},
    {"query": "red", "top_k": 5},
    [],
    "red",
], ids=["empty", "whitespace", "too-long", "k0", "k101", "k-string", "k-float", "k-bool", "k-null",
        "no-query", "query-null", "query-list", "unknown-field", "json-list", "json-string"])
def test_text_validation_errors(client, payload):
    err = assert_error(client.post("/search/text", json=payload), 422, "invalid_request")
    assert err["details"] and all({"loc", "msg", "type"} == set(d) for d in err["details"])


def test_query_at_the_limit_is_fine(client):
    assert client.post("/search/text", json={"query": "r" * 1000}).status_code == 200


def test_invalid_json(client):
    r = client.post("/search/text", content=b'{"query": "red",', headers={"content-type": "application/json"})
    assert_error(r, 422, "invalid_request")


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_text_wrong_content_type(client, content_type):
    headers = {"content-type": content_type} if content_type else {}
    r = client.post("/search/text", content=b'{"query": "red"}', headers=headers)
    assert_error(r, 415, "unsupported_media_type")


def test_text_body_too_large(client):
    r = client.post("/search/text", json={"query": "red", "pad": "x" * 70_000})
    assert_error(r, 413, "payload_too_large")


def test_image_wrong_content_type(client):
    assert_error(client.post("/search/image", content=b"abc", headers={"content-type": "text/plain"}), 415,
                 "unsupported_media_type")
    # JSON is the other body it takes: a field it does not know is a 422, not a 415
    assert_error(client.post("/search/image", json={"file": "abc"}), 422, "invalid_request")


def test_image_no_file(client):
    err = assert_error(client.post("/search/image", data={"k": "3"},
                                   files={"other": ("x.png", b"abc", "image/png")}), 422, "invalid_request")
    assert any(d["loc"][-1] == "file" for d in err["details"])


def test_image_file_as_plain_field(client):
    r = client.post("/search/image", files={"k": (None, "3"), "file": (None, "not a file")})
    assert_error(r, 422, "invalid_request")


@pytest.mark.parametrize("k", ["0", "101", "abc", "2.5", "-3"])
def test_image_bad_k(client, fakes, k):
    data = fakes.png_bytes(fakes.image("solid", "red"))
    r = client.post("/search/image", files={"file": ("a.png", data, "image/png")}, data={"k": k})
    assert_error(r, 422, "invalid_request")


def _truncated_jpeg(fakes) -> bytes:
    big = Image.fromarray(__import__("numpy").random.default_rng(0).integers(0, 255, (64, 64, 3), dtype="uint8"))
    data = fakes.png_bytes(big, "JPEG")
    return data[: len(data) // 2]


def _bomb_png() -> bytes:
    # 10000 x 10000 one-bit PNG: a few KB on the wire, 100 MP once decoded
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name,data", [
    ("empty.jpg", b""),
    ("notes.jpg", b"this is a text file, not a picture\n" * 10),
    ("half.jpg", None),
    ("garbage.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64),
    ("bomb.png", "bomb"),
], ids=["zero-bytes", "text-as-jpg", "truncated-jpeg", "corrupt-png", "pixel-bomb"])
def test_image_bad_content(client, fakes, name, data):
    if data is None:
        data = _truncated_jpeg(fakes)
    elif data == "bomb":
        data = _bomb_png()
    r = client.post("/search/image", files={"file": (name, data, "image/jpeg")})
    err = assert_error(r, 422, "invalid_image")
    assert "/" not in err["message"]  # no server paths


def test_image_upload_too_large(make_client, fakes):
    client = make_client(max_upload_bytes=4096)
    small = fakes.png_bytes(fakes.image("solid", "red"))
    assert client.post("/search/image", files={"file": ("a.png", small, "image/png")}).status_code == 200
    big = b"\xff\xd8\xff" + b"\x00" * 10_000
    assert_error(client.post("/search/image", files={"file": ("big.jpg", big, "image/jpeg")}),
                 413, "payload_too_large")
    # just over the file cap but within the body allowance: caught while reading the part
    edge = b"\xff\xd8\xff" + b"\x00" * 4094
    assert_error(client.post("/search/image", files={"file": ("edge.jpg", edge, "image/jpeg")}),
                 413, "payload_too_large")


def test_upload_rejected_by_content_length_without_reading(client):
    """At the ASGI level: a too-large Content-Length is answered before a single body read."""
    app = client.app
    reads, sent = [], []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"x" * 1024, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/search/image", "raw_path": b"/search/image", "root_path": "",
             "query_string": b"", "server": ("test", 80), "client": ("test", 1),
             "headers": [(b"content-type", b"multipart/form-data; boundary=abc"),
                         (b"content-length", str(50 * 1024 * 1024).encode())]}
    asyncio.run(app(scope, receive, send))
    assert reads == []
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"]["code"] == "payload_too_large"


def test_chunked_upload_over_cap(make_client):
    client = make_client(max_upload_bytes=4096)

    def chunks():
        yield b"--abc\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\r\n"
        for _ in range(100):
            yield b"\x00" * 1024

    r = client.post("/search/image", content=chunks(),
                    headers={"content-type": "multipart/form-data; boundary=abc"})
    assert_error(r, 413, "payload_too_large")


def test_unknown_route_and_method(client):
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/search/text"), 405, "method_not_allowed")
