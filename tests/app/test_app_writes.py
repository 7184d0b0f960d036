"""The write routes against a collection on disk, opened writable, with the fake encoder.

Idempotent upload, delete, caption replace, read-your-write (the cache key changes with the write),
auth (404 without a token configured, 401 with a wrong or missing one), every hostile upload of
/search/image also on the upload route (nothing written), write admission (429), the metrics, a
commit by another process picked up without a restart, and writes refused where the folder is
read-only.
"""

from __future__ import annotations

import base64
import io
import re
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from clipsearch.artifacts import ArtifactLayout
from clipsearch.store import Catalog, FaissStore, NewItem

from app.config import Settings
from app.main import create_app
from app.resources import make_resources, open_collections

TOKEN = "write-token-for-tests-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ADMIN_TOKEN = "admin-token-for-tests-0123"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}  # compact needs scope admin


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, "PNG")
    return buf.getvalue()


def _noise_png(seed: int, size: int = 16) -> bytes:
    return _png(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _declared_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def build_collection(root: Path, dataset, fakes, name: str = "test") -> Path:
    """The conftest dataset as collection `name` on disk, embedded by the fake encoder."""
    images, texts = dataset
    enc = fakes.ColorEncoder()
    img = enc.encode_images([Image.open(r["image_path"]) for r in images])
    items = []
    for i, r in enumerate(images):
        caps = [t["caption"] for t in texts if t["image_id"] == r["image_id"]]
        items.append(NewItem(r["image_id"], r["image_path"], img[i], captions=tuple(caps),
                             caption_vectors=enc.encode_texts(caps) if caps else None,
                             metadata={"kind": r["image_id"].split("_")[1]}))
    with Catalog(ArtifactLayout(root).collection(name).catalog) as catalog:
        catalog.set_model(fakes.FAKE_MODEL, fakes.ColorEncoder.dim)
        catalog.put(items)
    return root


def fake_loader(encoder):
    def load(settings: Settings):
        stores, skipped, model, default = open_collections(settings)
        return make_resources(encoder, list(stores.values()), model, default=default,
                              base_dir=settings.artifacts_dir, skipped=skipped)
    return load


@pytest.fixture
def artifacts(tmp_path, dataset, fakes) -> Path:
    return build_collection(tmp_path / "artifacts", dataset, fakes)


@pytest.fixture
def start(artifacts, fakes, tmp_path):
    clients = []

    def make(encoder=None, read_key: bool = True, **overrides) -> TestClient:
        """`read_key`: every request of the client carries the write token (X-API-Key) unless it says
        otherwise, so reads work once a key is configured (app/auth.py)."""
        values = {"artifacts_dir": artifacts, "write_token": TOKEN, "torch_threads": 1, "inference_threads": 2,
                  "device": "cpu", "refresh_interval_ms": 0, **overrides}
        if values["write_token"] is None:
            del values["write_token"]
        app = create_app(Settings(**values), loader=fake_loader(encoder or fakes.ColorEncoder()))
        client = TestClient(app, client=("127.0.0.1", 50000),
                            headers={"X-API-Key": TOKEN} if read_key and "write_token" in values else None)
        client.__enter__()
        clients.append(client)
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, client.get("/readyz").json()
            time.sleep(0.02)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def upload(client, data: bytes, *, captions=(), metadata=None, image_id=None, headers=AUTH, name="test"):
    form: dict = {}
    if captions:
        form["caption"] = list(captions)
    if metadata is not None:
        form["metadata"] = metadata
    if image_id is not None:
        form["image_id"] = image_id
    return client.post(f"/collections/{name}/media", files={"file": ("x.png", data, "image/png")}, data=form,
                       headers=headers)


def image_search(client, data: bytes, k: int = 3, target: str = "images") -> dict:
    r = client.post("/search/image", files={"file": ("q.png", data, "image/png")},
                    data={"k": str(k), "target": target})
    assert r.status_code == 200, r.text
    return r.json()


def count(client) -> int:
    return client.get("/collections").json()["collections"][0]["images"]


def metric(client, name: str, **labels) -> float:
    text = client.get("/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    assert m, f"{name}{{{want}}} not in /metrics"
    return float(m.group(1))


# --- auth ---------------------------------------------------------------------------------------

def test_without_a_token_the_routes_do_not_exist(start):
    client = start(write_token=None)
    assert upload(client, _noise_png(1)).status_code == 404
    assert client.delete("/collections/test/media/x", headers=AUTH).status_code == 404
    assert client.put("/collections/test/media/x/captions", json={"captions": []}, headers=AUTH).status_code == 404
    assert client.post("/collections/test/compact", headers=AUTH).status_code == 404
    assert count(client) == 12


def test_wrong_or_missing_token_is_401(start):
    client = start(read_key=False)
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}):
        r = upload(client, _noise_png(1), headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert client.delete("/collections/test/media/00_solid_red.png", headers=headers).status_code == 401
        assert client.put("/collections/test/media/00_solid_red.png/captions", json={"captions": ["x"]},
                          headers=headers).status_code == 401
        assert client.post("/collections/test/compact", headers=headers).status_code == 401
    assert client.get("/collections", headers=AUTH).json()["collections"][0]["images"] == 12
    assert client.get("/collections/test/items/00_solid_red.png", headers=AUTH).status_code == 200


# --- upload, idempotency, read-your-write ------------------------------------------------------------

def test_upload_is_found_at_once_and_idempotent(start, artifacts):
    client = start()
    data = _noise_png(7)
    before = image_search(client, data)
    assert before["cached"] is False
    again = image_search(client, data)
    assert again["cached"] is True  # the same question, same version: from the cache
    version0 = client.get("/readyz").json()["index_version"]

    r = upload(client, data, captions=["a  noisy   square"], metadata='{"album": "2024", "n": 3}')
    assert r.status_code == 201, r.text
    item = r.json()
    sha = __import__("hashlib").sha256(data).hexdigest()
    assert item["image_id"] == sha and item["created"] is True
    assert item["captions"] == ["a noisy square"] and item["metadata"] == {"album": "2024", "n": 3}
    assert item["image_url"] == f"/images/{sha}"
    # read-your-write: the next search sees it (new version, so not the cached answer)
    assert client.get("/readyz").json()["index_version"] != version0
    after = image_search(client, data)
    assert after["cached"] is False and after["results"][0]["image_id"] == sha
    assert after["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert count(client) == 13
    # the bytes live under the collection's media/, content-addressed, and are served back
    stored = artifacts / "collections" / "test" / "media" / sha[:2] / f"{sha}.png"
    assert stored.read_bytes() == data
    assert client.get(item["image_url"]).content == data
    assert client.get(f"/collections/test/items/{sha}").json()["captions"] == ["a noisy square"]
    # a filter on the new metadata finds it
    r = client.post("/search/text", json={"query": "noisy", "k": 5, "filter": {"album": "2024"}})
    assert [h["image_id"] for h in r.json()["results"]] == [sha]

    # the same bytes again: one item, 200, nothing rewritten
    version1 = client.get("/readyz").json()["index_version"]
    r = upload(client, data)
    assert r.status_code == 200 and r.json()["created"] is False and r.json()["image_id"] == sha
    assert r.json()["captions"] == ["a noisy square"]  # kept: none were given
    assert client.get("/readyz").json()["index_version"] == version1 and count(client) == 13
    # an explicit id is another item with the same bytes
    r = upload(client, data, image_id="holiday/beach.png", captions=["beach"])
    assert r.status_code == 201 and r.json()["image_id"] == "holiday/beach.png"
    assert count(client) == 14
    assert {h["image_id"] for h in image_search(client, data, k=2)["results"]} == {sha, "holiday/beach.png"}


def test_upload_survives_a_restart(start, artifacts):
    client = start()
    data = _noise_png(11)
    sha = upload(client, data, captions=["kept"]).json()["image_id"]
    client.__exit__(None, None, None)
    client2 = start()
    assert image_search(client2, data)["results"][0]["image_id"] == sha
    assert client2.get(f"/collections/test/items/{sha}").json()["captions"] == ["kept"]


# --- delete, captions ---------------------------------------------------------------------------

def test_delete_removes_from_every_search(start, dataset, fakes):
    client = start()
    red = "00_solid_red.png"
    red_bytes = Path(dataset[0][0]["image_path"]).read_bytes()
    assert image_search(client, red_bytes)["results"][0]["image_id"] == red
    assert client.delete(f"/collections/test/media/{red}", headers=AUTH).status_code == 204
    assert client.get(f"/images/{red}").status_code == 404
    assert client.get(f"/collections/test/items/{red}").status_code == 404
    assert red not in [h["image_id"] for h in image_search(client, red_bytes, k=20)["results"]]
    caps = image_search(client, red_bytes, k=50, target="captions")["results"]
    assert all(h["image_id"] != red for h in caps)
    r = client.post("/search/text", json={"query": "a plain red square", "k": 20})
    assert red not in [h["image_id"] for h in r.json()["results"]]
    r = client.post("/search/similar", json={"image_id": red, "k": 3})
    assert r.status_code == 404
    assert count(client) == 11
    assert client.delete(f"/collections/test/media/{red}", headers=AUTH).status_code == 404
    assert client.delete("/collections/nope/media/x", headers=AUTH).status_code == 404


def test_caption_replace(start):
    client = start()
    blue = "02_solid_blue.png"
    r = client.put(f"/collections/test/media/{blue}/captions", json={"captions": ["an orange sunset"]}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["captions"] == ["an orange sunset"]
    assert client.get(f"/collections/test/items/{blue}").json()["captions"] == ["an orange sunset"]
    # the caption index follows: the new caption is found for its words, the old ones are gone
    q = _png(np.full((16, 16, 3), (30, 40, 220), np.uint8))
    caps = image_search(client, q, k=50, target="captions")["results"]
    texts = {h["caption"] for h in caps if h["image_id"] == blue}
    assert texts == {"an orange sunset"}
    assert client.put("/collections/test/media/nope.png/captions", json={"captions": ["x"]},
                      headers=AUTH).status_code == 404
    r = client.put(f"/collections/test/media/{blue}/captions", json={"captions": ["  "]}, headers=AUTH)
    assert r.status_code == 422
    r = client.put(f"/collections/test/media/{blue}/captions", json={"captions": []}, headers=AUTH)
    assert r.status_code == 200 and r.json()["captions"] == []


# --- hostile uploads: every check /search/image makes, nothing written -------------------------------

HOSTILE = {
    "corrupt": (_png(np.zeros((8, 8, 3), np.uint8))[:40], 422, "invalid_image"),
    "not an image": (b"just some text, not a picture\n" * 4, 422, "invalid_image"),
    "empty": (b"", 422, "invalid_image"),
    "decompression bomb": (_declared_png(100_000, 100_000), 422, "invalid_image"),
    "over the pixel cap": (_declared_png(3000, 3000), 422, "invalid_image"),
    "oversize": (b"\x89PNG" + b"\x00" * 5000, 413, "payload_too_large"),
}


@pytest.mark.parametrize("kind", HOSTILE, ids=list(HOSTILE))
def test_hostile_uploads_are_refused_and_write_nothing(start, artifacts, kind):
    client = start(max_upload_bytes=4096, max_image_pixels=1_000_000)
    data, status, code = HOSTILE[kind]
    # the same bytes on /search/image get the same answer
    r = client.post("/search/image", files={"file": ("q.png", data, "image/png")})
    assert (r.status_code, r.json()["error"]["code"]) == (status, code)
    r = upload(client, data)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and "Traceback" not in r.text and str(artifacts) not in r.text
    assert count(client) == 12
    media = artifacts / "collections" / "test" / "media"
    assert not media.exists() or not any(p.is_file() for p in media.rglob("*"))


def test_bad_fields_are_422_or_415(start):
    client = start()
    data = _noise_png(3)
    assert upload(client, data, metadata="[1, 2]").status_code == 422
    assert upload(client, data, metadata="{not json").status_code == 422
    assert upload(client, data, metadata='{"x": NaN}').status_code == 422
    assert upload(client, data, captions=["   "]).status_code == 422
    assert upload(client, data, captions=["x" * 1001]).status_code == 422  # over max_query_chars
    assert upload(client, data, captions=[f"c{i}" for i in range(33)]).status_code == 422  # over max_captions
    assert upload(client, data, image_id="bad\x00id").status_code == 422
    r = client.post("/collections/test/media", json={"file": "x"}, headers=AUTH)
    assert r.status_code == 415
    assert upload(client, data, name="nope").status_code == 404
    assert count(client) == 12


def test_searches_embed_plain_and_stored_images_as_ingest_does(start, fakes):
    """Test-time augmentation is the stored images' (paid at ingest); a search pays one plain forward."""
    enc = fakes.ColorEncoder()
    client = start(encoder=enc)
    image_search(client, _noise_png(31))
    assert enc.tta_calls == [False]
    assert upload(client, _noise_png(32)).status_code == 201
    assert enc.tta_calls[-1] is True
    r = client.post("/embed/image", files={"file": ("e.png", _noise_png(33), "image/png")})
    assert r.status_code == 200, r.text
    assert enc.tta_calls[-1] is True  # /embed/image gives the vector as the collection would store it
    r = client.post("/search", json={"terms": [{"image": base64.b64encode(_noise_png(34)).decode()}], "k": 2})
    assert r.status_code == 200, r.text
    assert enc.tta_calls[-1] is False
    # told to, a search embeds its image as the collection stores it
    enc2 = fakes.ColorEncoder()
    client2 = start(encoder=enc2, query_image_tta=True)
    image_search(client2, _noise_png(35))
    r = client2.post("/search", json={"terms": [{"image": base64.b64encode(_noise_png(36)).decode()}], "k": 2})
    assert r.status_code == 200, r.text
    assert enc2.tta_calls == [True, True]


# --- admission, metrics, compaction --------------------------------------------------------------

def test_writes_beyond_their_bound_get_429(start, fakes):
    class GatedImages(fakes.ColorEncoder):
        def __init__(self):
            super().__init__()
            self.entered, self.release = threading.Event(), threading.Event()

        def encode_images(self, images, tta=True):
            self.entered.set()
            assert self.release.wait(10)
            return super().encode_images(images, tta)

    enc = GatedImages()
    client = start(encoder=enc, write_max_in_flight=1)
    first: dict = {}
    t = threading.Thread(target=lambda: first.update(r=upload(client, _noise_png(21))))
    t.start()
    assert enc.entered.wait(10)
    r = upload(client, _noise_png(22))
    assert r.status_code == 429 and r.headers["Retry-After"] and r.json()["error"]["code"] == "overloaded"
    # searches are not held back by the write bound
    assert client.post("/search/text", json={"query": "red", "k": 1}).status_code == 200
    enc.release.set()
    t.join(10)
    assert first["r"].status_code == 201
    assert metric(client, "clipsearch_writes_total", op="upload", result="rejected") == 1


def test_metrics_and_compaction(start):
    client = start(exact_max=4, compact_tombstones=0, compact_delta=0,  # HNSW graphs; compaction by hand
                   admin_token=ADMIN_TOKEN)
    assert metric(client, "clipsearch_collection_rows", collection="test", target="images") == 12
    ids = [upload(client, _noise_png(30 + i)).json()["image_id"] for i in range(3)]
    assert client.delete(f"/collections/test/media/{ids[0]}", headers=AUTH).status_code == 204
    assert metric(client, "clipsearch_writes_total", op="upload", result="created") == 3
    assert metric(client, "clipsearch_writes_total", op="delete", result="deleted") == 1
    assert metric(client, "clipsearch_collection_rows", collection="test", target="images") == 14
    assert metric(client, "clipsearch_tombstones_pending", collection="test", target="images") == 1
    assert metric(client, "clipsearch_delta_rows", collection="test", target="images") == 3
    assert client.post("/collections/test/compact", headers=AUTH).status_code == 403  # write < admin
    r = client.post("/collections/test/compact", headers=ADMIN)
    assert r.status_code == 200 and r.json()["compacted"] is True and r.json()["images"] == 14
    assert metric(client, "clipsearch_tombstones_pending", collection="test", target="images") == 0
    assert metric(client, "clipsearch_delta_rows", collection="test", target="images") == 0
    assert metric(client, "clipsearch_compactions_total", collection="test") == 1
    assert metric(client, "clipsearch_compaction_seconds_count", collection="test") == 1
    for i, image_id in enumerate(ids[1:], 1):  # still found after the swap
        assert image_search(client, _noise_png(30 + i))["results"][0]["image_id"] == image_id


def test_background_compaction_starts_past_the_threshold(start):
    client = start(exact_max=4, compact_tombstones=2, compact_delta=0)
    for image_id in ("00_solid_red.png", "01_solid_green.png"):
        assert client.delete(f"/collections/test/media/{image_id}", headers=AUTH).status_code == 204
    deadline = time.monotonic() + 10
    while metric(client, "clipsearch_tombstones_pending", collection="test", target="images") > 0:
        assert time.monotonic() < deadline, "no background compaction dropped the tombstones"
        time.sleep(0.05)
    assert metric(client, "clipsearch_compactions_total", collection="test") >= 1
    assert metric(client, "clipsearch_tombstones_pending", collection="test", target="captions") == 0
    assert count(client) == 10


# --- offline and online meet ----------------------------------------------------------------------

def test_commits_of_another_process_are_picked_up(start, artifacts, fakes):
    client = start(refresh_interval_ms=50)
    layout = ArtifactLayout(artifacts).collection("test")
    other = FaissStore.open(layout, readonly=False)  # stands in for `python -m offline ingest`
    vec = fakes.ColorEncoder().image_vector(Image.open(io.BytesIO(_noise_png(40))))
    other.add([NewItem("from-offline.png", "/nowhere/from-offline.png", vec, metadata={"kind": "offline"})])
    other.delete(["03_solid_yellow.png"])
    other.close()
    deadline = time.monotonic() + 10
    # two commits: the service's poll may pick up the first before the second is made, so wait for both
    while (image_search(client, _noise_png(40))["results"][0]["image_id"] != "from-offline.png"
           or client.get("/collections/test/items/03_solid_yellow.png").status_code != 404):
        assert time.monotonic() < deadline, "the other process's commits were never picked up"
        time.sleep(0.05)
    assert count(client) == 12


def test_writes_need_a_writable_folder_reason(artifacts, fakes, monkeypatch):
    import app.resources as resources

    from clipsearch.manifest import ArtifactError

    monkeypatch.setattr(resources.os, "access", lambda path, mode: False)
    settings = Settings(artifacts_dir=artifacts, write_token=TOKEN, torch_threads=1)
    with pytest.raises(ArtifactError, match=r"writes are enabled \(CLIPSEARCH_WRITE_TOKEN\) but its folder "
                                            r"collections/test is not writable"):
        open_collections(settings)
    open_collections(Settings(artifacts_dir=artifacts, torch_threads=1))  # read-only serving still works
