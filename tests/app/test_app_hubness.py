"""The hubness corrections in the service: which queries rank by the corrected score, and the offsets
new rows get (uploads and caption replacements take theirs from the project's banks, as ingest does).

A collection on disk (fake encoder) is given both corrections the way ingest gives them: banks under
`<artifacts>/hubness/` recorded in hubness.json for its model, and every row's offset set from them.
"""

from __future__ import annotations

import numpy as np
import pytest

from clipsearch.artifacts import ArtifactLayout
from clipsearch.collection import Collection, load_banks
from clipsearch.hubness import BANK_FILES, Banks, correction_info, hubness_dir, hubness_path
from clipsearch.manifest import save_npy_atomic, sha256_file, write_json_atomic
from clipsearch.store import Catalog

from app.config import Settings
from app.main import create_app
from app.resources import make_resources, open_collections
from tests.app.test_app_writes import AUTH, TOKEN, _noise_png, build_collection, upload

from fastapi.testclient import TestClient


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_banks(root, model, dim: int, seed: int = 0) -> Banks:
    """hubness.json and two banks of random unit vectors for `model`."""
    rng = np.random.default_rng(seed)
    hdir = hubness_dir(root)
    parts = {}
    for gallery, beta, k in (("captions", 0.5, 3), ("images", 0.4, 2)):
        save_npy_atomic(hdir / BANK_FILES[gallery], _unit(rng.normal(size=(20, dim))))
        parts[gallery] = {"beta": beta, "k": k, "bank_split": "train", "bank_count": 20,
                          "bank_sha256": sha256_file(hdir / BANK_FILES[gallery]), "selected_on": "val"}
    write_json_atomic(hubness_path(root), {**parts["captions"], "text_to_image": parts["images"],
                                           "model": dict(model)})
    return Banks.load(root, model)


def apply_offsets(root, name: str, banks: Banks) -> None:
    with Catalog(ArtifactLayout(root).collection(name).catalog) as catalog:
        rows, vecs = catalog.caption_vectors()
        catalog.set_caption_offsets(rows, banks.caption_offsets(vecs), banks.captions.info)
        rows, vecs = catalog.image_vectors()
        catalog.set_image_offsets(rows, banks.image_offsets(vecs), banks.images.info)


@pytest.fixture
def served(tmp_path, dataset, fakes):
    root = build_collection(tmp_path / "artifacts", dataset, fakes)
    banks = write_banks(root, fakes.FAKE_MODEL, fakes.ColorEncoder.dim)
    apply_offsets(root, "test", banks)
    encoder = fakes.ColorEncoder()

    def load(settings: Settings):  # the service's own loader, with the fake encoder
        stores, skipped, model, default = open_collections(settings)
        return make_resources(encoder, list(stores.values()), model, default=default,
                              base_dir=settings.artifacts_dir, skipped=skipped,
                              banks=load_banks(settings.artifacts_dir, model))

    app = create_app(Settings(artifacts_dir=root, write_token=TOKEN, torch_threads=1, inference_threads=2,
                              device="cpu", refresh_interval_ms=0), loader=load)
    with TestClient(app, client=("127.0.0.1", 50000), headers={"X-API-Key": TOKEN}) as client:
        for _ in range(500):
            if client.get("/readyz").status_code == 200:
                break
        yield client, root, banks, encoder


def test_the_banks_load_for_the_served_model_only(served, fakes):
    _, root, banks, _ = served
    assert banks.captions is not None and banks.images is not None
    assert banks.images.info == correction_info({**banks.images.info})
    assert Banks.load(root, {**fakes.FAKE_MODEL, "model": "another"}) == Banks()


def test_text_queries_rank_images_by_the_corrected_score_and_image_queries_by_the_cosine(served, fakes, dataset):
    client, root, banks, encoder = served
    images, _ = dataset
    with Catalog(ArtifactLayout(root).collection("test").catalog, readonly=True) as catalog:
        rows = catalog.rows()
    offsets = dict(zip(rows.image_ids, rows.image_offsets))
    assert any(abs(v) > 1e-3 for v in offsets.values())
    q = "a plain red square"
    hits = client.post("/search/text", json={"query": q, "k": 12}).json()["results"]
    qv = encoder.text_vector(q)
    vec = dict(zip(rows.image_ids, rows.vectors))
    for h in hits:
        assert h["score"] == pytest.approx(float(qv @ vec[h["image_id"]]) + offsets[h["image_id"]], abs=1e-5)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    # image -> image: the plain cosine (an image is its own best match, whatever its offset)
    with open(images[0]["image_path"], "rb") as fh:
        data = fh.read()
    r = client.post("/search/image", files={"file": ("q.png", data, "image/png")}, data={"k": "3"}).json()
    assert r["results"][0]["image_id"] == images[0]["image_id"]
    assert r["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    # image -> captions: the caption offsets apply (score = cosine + offset)
    r = client.post("/search/image", files={"file": ("q.png", data, "image/png")},
                    data={"k": "5", "target": "captions"}).json()
    for h in r["results"]:
        assert h["score"] != pytest.approx(h["cosine"], abs=1e-6)


def test_uploads_and_new_captions_get_their_offsets_from_the_banks(served):
    client, root, banks, encoder = served
    r = upload(client, _noise_png(7), captions=["a plain red square, uploaded"], image_id="new")
    assert r.status_code == 201, r.text
    with Catalog(ArtifactLayout(root).collection("test").catalog, readonly=True) as catalog:
        rows = catalog.rows()
    i = rows.image_ids.index("new")
    assert rows.image_offsets[i] == pytest.approx(float(banks.image_offsets(rows.vectors[i:i + 1])[0]), abs=1e-6)
    assert rows.image_offsets[i] != 0
    js = [j for j, row in enumerate(rows.caption_image_rows) if row == i]
    np.testing.assert_allclose(rows.caption_offsets[js], banks.caption_offsets(rows.caption_vectors[js]), atol=1e-6)
    # found at once by a text query, scored like every other row
    q = "a plain red square, uploaded"
    hits = client.post("/search/text", json={"query": q, "k": 20}).json()["results"]
    hit = next(h for h in hits if h["image_id"] == "new")
    assert hit["score"] == pytest.approx(float(encoder.text_vector(q) @ rows.vectors[i]) + rows.image_offsets[i],
                                         abs=1e-5)
    # a caption replacement gets offsets too
    r = client.put("/collections/test/media/new/captions", json={"captions": ["green", "blue things"]},
                   headers=AUTH)
    assert r.status_code == 200, r.text
    with Catalog(ArtifactLayout(root).collection("test").catalog, readonly=True) as catalog:
        rows = catalog.rows()
    js = [j for j, t in enumerate(rows.caption_texts) if t in ("green", "blue things")]
    assert len(js) == 2
    np.testing.assert_allclose(rows.caption_offsets[js], banks.caption_offsets(rows.caption_vectors[js]), atol=1e-6)


def test_a_collection_built_without_a_correction_gives_new_rows_none(tmp_path, dataset, fakes):
    root = build_collection(tmp_path / "artifacts", dataset, fakes)
    banks = write_banks(root, fakes.FAKE_MODEL, fakes.ColorEncoder.dim)  # banks exist, the collection has none
    stores, _, model, default = open_collections(Settings(artifacts_dir=root, write_token=TOKEN))
    res = make_resources(fakes.ColorEncoder(), list(stores.values()), model, default=default, banks=banks)
    assert Collection.served(res.store(), res.banks).banks == Banks()
    for s in stores.values():
        s.close()
