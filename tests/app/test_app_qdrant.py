"""The service on a Qdrant store answers as on FAISS: the same collection (copied with `offline migrate`)
served from qdrant-client's local mode gives the same JSON for text, image and similar searches,
with filters, pagination, min_score, caption targets with the hubness offsets, /collections and items.
And `CLIPSEARCH_STORE=qdrant:PATH` makes start-up discover and serve it (real tiny model), with no
catalog left under ARTIFACTS_DIR."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from clipsearch.artifacts import ArtifactLayout
from clipsearch.store import FaissStore
from clipsearch.store.qdrant_store import QdrantLocation, QdrantStore
from offline.migrate import migrate, migrate_catalog

from app.resources import make_resources

VOLATILE = {"took_ms", "cached", "version", "index_version"}


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _assert_same_json(a, b) -> None:
    """Equal JSON, scores to 1e-5 (the engines sum in different orders)."""
    a, b = _strip(a), _strip(b)
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (a, b)
        for k in a:
            _assert_same_json(a[k], b[k])
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), (a, b)
        for x, y in zip(a, b):
            _assert_same_json(x, y)
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-5)
    else:
        assert a == b


@pytest.fixture
def pair(make_client, dataset, fakes, tmp_path, encoder):
    """(FAISS client, Qdrant client) over the same fake collection, with hubness offsets on captions."""
    images, texts = dataset
    offsets = np.random.default_rng(0).normal(0, 0.05, len(texts)).astype(np.float32)
    hub = {"beta": 0.2, "k": 3}
    faiss_store = fakes.fake_store(dataset, caption_offsets=offsets, hubness=hub)
    spec = f"qdrant:{tmp_path / 'qdrant'}"
    summary = migrate_catalog(faiss_store.catalog, "test", spec, progress=False)
    assert (summary["images"], summary["captions"]) == (len(images), len(texts))
    qdrant_store = QdrantStore.open(QdrantLocation(path=str(tmp_path / "qdrant")), "test")
    clients = []
    for store in (faiss_store, qdrant_store):
        res = make_resources(fakes.ColorEncoder(), [store], fakes.FAKE_MODEL)
        clients.append(make_client(resources=res))
    yield clients
    qdrant_store.close()


def _image_form(data: bytes, **form):
    return {"files": {"file": ("q.png", data, "image/png")},
            "data": {k: (json.dumps(v) if k == "filter" else str(v)) for k, v in form.items()}}


def test_same_answers_on_faiss_and_qdrant(pair, dataset, fakes):
    images, _ = dataset
    red_white = fakes.png_bytes(fakes.image("stripes", "red", "white"))
    texts = [
        {"query": "red", "k": 12},
        {"query": "a blue and yellow thing", "k": 4, "offset": 3},
        {"query": "red", "k": 12, "filter": {"kind": "solid"}},
        {"query": "green", "k": 5, "filter": {"kind": ["stripes", "checkerboard"]}},
        {"query": "pink", "k": 12, "filter": {"index": [1.0, 4, 9]}},
        {"query": "black", "k": 12, "min_score": 0.2},
        {"query": "white", "k": 3, "filter": {"kind": "nothing"}},
    ]
    faiss_client, qdrant_client = pair
    for body in texts:
        a, b = (c.post("/search/text", json=body) for c in pair)
        assert a.status_code == b.status_code == 200, (a.text, b.text)
        _assert_same_json(a.json(), b.json())
    forms = [{"k": 12}, {"k": 5, "offset": 5}, {"k": 30, "target": "captions"},
             {"k": 6, "target": "captions", "filter": {"kind": "stripes"}}, {"k": 12, "min_score": 0.3}]
    for form in forms:
        a, b = (c.post("/search/image", **_image_form(red_white, **form)) for c in pair)
        assert a.status_code == b.status_code == 200, (a.text, b.text)
        _assert_same_json(a.json(), b.json())
        assert a.json()["results"], form
    for body in ({"image_id": images[2]["image_id"], "k": 5},
                 {"image_id": images[9]["image_id"], "k": 4, "offset": 2, "filter": {"kind": "solid"}}):
        a, b = (c.post("/search/similar", json=body) for c in pair)
        assert a.status_code == b.status_code == 200, (a.text, b.text)
        _assert_same_json(a.json(), b.json())
    a, b = (c.get("/collections") for c in pair)
    _assert_same_json(a.json(), b.json())
    assert b.json()["collections"][0]["hubness"] == {"beta": 0.2, "k": 3}
    assert b.json()["collections"][0]["metadata_fields"]["kind"] == ["checkerboard", "solid", "stripes"]
    for image_id in (images[0]["image_id"], images[11]["image_id"], "missing.png"):
        a, b = (c.get(f"/collections/test/items/{image_id}") for c in pair)
        assert a.status_code == b.status_code
        _assert_same_json(a.json(), b.json())
    # bad input stays a 4xx on Qdrant too
    r = qdrant_client.post("/search/text", json={"query": "red", "filter": {"kind": {"a": 1}}})
    assert 400 <= r.status_code < 500


def _wait_loaded(client, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        r = client.get("/readyz")
        if r.status_code == 200 or not r.json()["reason"].startswith("loading"):
            return r
        assert time.monotonic() < deadline, "resources never finished loading"
        time.sleep(0.02)


def test_store_setting_serves_a_migrated_collection(make_client, tiny_artifacts, dataset, fakes, tmp_path):
    images, texts = dataset
    root = Path(shutil.copytree(tiny_artifacts, tmp_path / "artifacts"))
    spec = f"qdrant:{tmp_path / 'qdrant'}"
    first = migrate(str(root), "tiny", spec, progress=False)
    assert not first["up_to_date"] and first["copied_items"] == len(images)
    assert migrate(str(root), "tiny", spec, progress=False)["up_to_date"]  # idempotent: nothing to do
    shutil.rmtree(ArtifactLayout(root).collection("tiny").dir)  # served from Qdrant alone
    client = make_client(resources=None, artifacts_dir=root, store=spec)
    r = _wait_loaded(client)
    assert r.status_code == 200, r.text
    assert r.json()["default_collection"] == "tiny"
    assert r.json()["collections"] == {"tiny": {"images": len(images), "captions": len(texts)}}
    # the same catalog on FAISS, searched with the very encoder the Qdrant-served app loaded (the tiny
    # model has random weights: another load would embed differently)
    res = client.app.state.service.resources
    faiss_store = FaissStore.open(ArtifactLayout(tiny_artifacts).collection("tiny"))
    faiss_client = make_client(resources=make_resources(res.encoder, [faiss_store], res.model,
                                                        base_dir=tiny_artifacts))
    data = fakes.png_bytes(fakes.image("stripes", "red", "white"))
    for c in (faiss_client, client):
        assert c.post("/search/text", json={"query": "a red square", "k": 5}).status_code == 200
    for body in ({"query": "a red square", "k": 5}, {"query": "stripes", "k": 4, "offset": 2,
                                                      "filter": {"kind": ["stripes", "solid"]}}):
        a, b = (c.post("/search/text", json=body) for c in (faiss_client, client))
        _assert_same_json(a.json(), b.json())
    a, b = (c.post("/search/image", **_image_form(data, k=6, target="captions")) for c in (faiss_client, client))
    _assert_same_json(a.json(), b.json())
    a, b = (c.get("/collections") for c in (faiss_client, client))
    _assert_same_json(a.json(), b.json())


def test_unknown_qdrant_store_is_a_clear_start_up_error(make_client, tiny_artifacts, tmp_path):
    client = make_client(resources=None, artifacts_dir=tiny_artifacts, store=f"qdrant:{tmp_path / 'empty'}")
    r = _wait_loaded(client)
    assert r.status_code == 503 and "offline migrate" in r.json()["reason"]


def test_store_setting_is_validated(monkeypatch):
    from pydantic import ValidationError

    from app.config import Settings

    monkeypatch.setenv("CLIPSEARCH_STORE", "http://qdrant:6333")
    monkeypatch.setenv("CLIPSEARCH_QDRANT_API_KEY", "s3cret-key")
    settings = Settings()
    assert settings.store == "http://qdrant:6333"
    assert settings.qdrant_api_key.get_secret_value() == "s3cret-key" and "s3cret" not in repr(settings)
    assert Settings(store="qdrant:/var/q").store == "qdrant:/var/q" and Settings(store=" faiss ").store == "faiss"
    for bad in ("bogus", "qdrant:", "redis://x"):
        with pytest.raises(ValidationError, match="faiss"):
            Settings(store=bad)


def test_live_writes_on_a_qdrant_store(make_client, dataset, fakes, tmp_path):
    """The write routes (issue 12) on a Qdrant-served collection: an upload is found by the next image
    search, a caption replace reaches the captions target, a delete leaves every search."""
    import io

    from PIL import Image

    token = "write-token-for-qdrant-tests"
    auth = {"Authorization": f"Bearer {token}"}
    spec = f"qdrant:{tmp_path / 'qdrant'}"
    migrate_catalog(fakes.fake_store(dataset).catalog, "test", spec, progress=False)
    store = QdrantStore.open(QdrantLocation(path=str(tmp_path / "qdrant")), "test", readonly=False)
    client = make_client(resources=make_resources(fakes.ColorEncoder(), [store], fakes.FAKE_MODEL),
                         write_token=token, artifacts_dir=tmp_path / "artifacts", refresh_interval_ms=0,
                         headers=auth)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    data = buf.getvalue()

    def image_search(target: str = "images") -> list[dict]:
        r = client.post("/search/image", **_image_form(data, k=3, target=target))
        assert r.status_code == 200, r.text
        return r.json()["results"]

    before = client.get("/collections").json()["collections"][0]["images"]
    r = client.post("/collections/test/media", files={"file": ("n.png", data, "image/png")},
                    data={"caption": ["a noisy square of many colours"]}, headers=auth)
    assert r.status_code == 201, r.text
    new_id = r.json()["image_id"]
    assert image_search()[0]["image_id"] == new_id
    assert client.get("/collections").json()["collections"][0]["images"] == before + 1
    again = client.post("/collections/test/media", files={"file": ("n.png", data, "image/png")}, headers=auth)
    assert again.status_code == 200 and again.json()["image_id"] == new_id
    r = client.put(f"/collections/test/media/{new_id}/captions", json={"captions": ["confetti"]}, headers=auth)
    assert r.status_code == 200, r.text
    assert {h["caption"] for h in image_search("captions") if h["image_id"] == new_id} <= {"confetti"}
    assert client.delete(f"/collections/test/media/{new_id}", headers=auth).status_code == 204
    assert all(h["image_id"] != new_id for h in image_search())
    assert all(h["image_id"] != new_id for h in image_search("captions"))
    assert client.get(f"/images/{new_id}").status_code == 404
    assert client.get("/collections").json()["collections"][0]["images"] == before
    store.close()
