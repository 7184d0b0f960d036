"""Start-up against real on-disk collections embedded with the tiny open_clip model, and every way a
broken ARTIFACTS_DIR keeps the service un-ready with one clear reason."""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipsearch.artifacts import ArtifactLayout
from clipsearch.manifest import ArtifactError, sha256_file
from clipsearch.models import ModelLoadError, load_model
from clipsearch.store import Catalog, FaissStore

from app.resources import load_resources


def wait_loaded(client, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        r = client.get("/readyz")
        if r.status_code == 200 or not r.json()["reason"].startswith("loading"):
            return r
        assert time.monotonic() < deadline, "resources never finished loading"
        time.sleep(0.02)


@pytest.fixture
def artifacts(tiny_artifacts: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny artifacts that a test may break."""
    return Path(shutil.copytree(tiny_artifacts, tmp_path / "artifacts"))


def test_load_resources_real_tiny_model(fakes, tiny_artifacts, dataset, tmp_path):
    images, texts = dataset
    res = load_resources(fakes.settings_for(tmp_path, artifacts_dir=tiny_artifacts))
    assert res.model["model"] == "test-tiny-vit" and res.model["embed_dim"] == 32
    assert res.default_collection == "tiny" and list(res.collections) == ["tiny"] and res.skipped == {}
    store = res.store()
    assert store is res.store("tiny") and store.dim == res.encoder.dim == 32
    assert (store.count("images"), store.count("captions")) == (len(images), len(texts))
    assert (res.image_count, res.caption_count) == (len(images), len(texts))
    assert res.image_file(store, images[0]["image_id"]) == Path(images[0]["image_path"])
    item = store.get(images[0]["image_id"])
    assert item.captions == tuple(t["caption"] for t in texts if t["image_id"] == images[0]["image_id"])
    assert item.metadata == {"kind": "solid", "index": 0}
    assert store.describe()["index"] == {"images": "exact", "captions": "exact"}


def test_app_serves_real_artifacts(make_client, tiny_artifacts, dataset, fakes, caplog):
    with caplog.at_level("INFO", logger="app"):
        client = make_client(resources=None, artifacts_dir=tiny_artifacts)
        r = wait_loaded(client)
    assert r.status_code == 200, r.text
    assert r.json()["model"]["model"] == "test-tiny-vit"
    assert r.json()["default_collection"] == "tiny"
    assert r.json()["collections"] == {"tiny": {"images": len(dataset[0]), "captions": len(dataset[1])}}
    assert any(rec.message.startswith("ready: test-tiny-vit") for rec in caplog.records)
    ids = {row["image_id"] for row in dataset[0]}
    hits = client.post("/search/text", json={"query": "a red square", "k": 5}).json()["results"]
    assert len(hits) == 5 and {h["image_id"] for h in hits} <= ids
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert all(-1.0001 <= h["score"] <= 1.0001 for h in hits)
    data = fakes.png_bytes(fakes.image("stripes", "red", "white"))
    similar = client.post("/search/image", files={"file": ("q.png", data, "image/png")},
                          data={"k": "3"}).json()["results"]
    assert len(similar) == 3 and len({h["image_id"] for h in similar}) == 3 and {h["image_id"] for h in similar} <= ids
    caps = client.post("/search/image", files={"file": ("q.png", data, "image/png")},
                       data={"k": "3", "target": "captions"}).json()["results"]
    assert len(caps) == 3 and all(h["caption_id"] and h["caption"] for h in caps)


def _catalog(root: Path, name: str = "tiny") -> Path:
    return ArtifactLayout(root).collection(name).catalog


def _set_model(root: Path, name: str = "tiny", dim: int | None = None, **changes) -> None:
    """Change the model record of collection `name` (and, with `dim`, the dimension it declares)."""
    with Catalog(_catalog(root, name)) as catalog:
        catalog.set_model({**catalog.model(), **changes}, dim or catalog.dim)


def _sql(root: Path, statement: str, name: str = "tiny") -> None:
    """Edit a catalog behind the store's back, as a damaged or foreign file would look."""
    conn = sqlite3.connect(_catalog(root, name))
    conn.execute(statement)
    conn.commit()
    conn.close()


def _other_sqlite(path: Path) -> None:
    path.unlink()
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, name TEXT)")
    conn.commit()
    conn.close()


def _second_collection(root: Path, name: str = "b", **model_changes) -> None:
    """Collection `name`: a copy of `tiny`, embedded (it says) with another model."""
    layout = ArtifactLayout(root)
    shutil.copytree(layout.collection("tiny").dir, layout.collection(name).dir)
    _set_model(root, name, **model_changes)


NAMED = {"collections": "tiny"}  # CLIPSEARCH_COLLECTIONS=tiny: a named collection must exist
# name -> (break the artifacts, settings, the reason /readyz, the 503s and the one log line give)
BREAKERS = {
    "no-artifacts": (lambda r: shutil.rmtree(r), {}, "does not exist"),
    "no-collections": (lambda r: shutil.rmtree(r / "collections"), {},
                       "no collection under ARTIFACTS_DIR/collections"),
    "missing-catalog": (lambda r: _catalog(r).unlink(), NAMED,
                        "collection 'tiny' has no catalog (catalog.sqlite)"),
    "unknown-collection-named": (lambda r: None, {"collections": "tiny,nope"},
                                 "collection 'nope' has no catalog"),
    "default-not-served": (lambda r: None, {"default_collection": "nope"},
                           "CLIPSEARCH_DEFAULT_COLLECTION 'nope' is not among the served collections (tiny)"),
    "corrupt-catalog": (lambda r: _catalog(r).write_bytes(os.urandom(_catalog(r).stat().st_size)), {},
                        "collection 'tiny': catalog catalog.sqlite cannot be read (file is not a database)"),
    "truncated-catalog": (lambda r: _catalog(r).write_bytes(_catalog(r).read_bytes()[:8192]), {},
                          "collection 'tiny': catalog catalog.sqlite cannot be read"),
    "empty-catalog": (lambda r: _catalog(r).write_bytes(b""), {},
                      "collection 'tiny': catalog catalog.sqlite cannot be read"),
    "foreign-sqlite": (lambda r: _other_sqlite(_catalog(r)), {},
                       "collection 'tiny': catalog catalog.sqlite cannot be read (no such table: meta)"),
    "other-format": (lambda r: _sql(r, "UPDATE meta SET value = '2' WHERE key = 'format'"), {},
                     "collection 'tiny': catalog catalog.sqlite has format 2, this version reads 1"),
    "no-format": (lambda r: _sql(r, "DELETE FROM meta WHERE key = 'format'"), {},
                  "collection 'tiny': catalog catalog.sqlite has format None"),
    "damaged-vector": (lambda r: _sql(r, "UPDATE items SET vector = X'000102' WHERE row = 3"), {},
                       "collection 'tiny': catalog collections/tiny/catalog.sqlite cannot be read"),
    "damaged-metadata": (lambda r: _sql(r, "UPDATE items SET metadata = '{' WHERE row = 2"), {},
                         "collection 'tiny': catalog collections/tiny/catalog.sqlite cannot be read"),
    "no-model": (lambda r: _sql(r, "DELETE FROM meta WHERE key = 'model'"), {},
                 "collection 'tiny' names no model"),
    "model-mismatch-named": (lambda r: _second_collection(r, model="ViT-B-32", embed_dim=512),
                             {"collections": "tiny,b"},
                             "collection 'b' was embedded with ViT-B-32/random-init dim 512, the default "
                             "collection 'tiny' with test-tiny-vit/random-init dim 32; serve collections of "
                             "one model"),
    "unknown-model": (lambda r: _set_model(r, model="no-such-model"), {}, "Unknown model 'no-such-model'"),
    "model-dim-mismatch": (lambda r: _set_model(r, embed_dim=64), {},
                           "collection 'tiny' holds 32-d vectors but names the model "
                           "test-tiny-vit/random-init dim 64"),
    "vector-dim-mismatch": (lambda r: _set_model(r, dim=16), {},
                            "collection 'tiny' holds 16-d vectors but names the model "
                            "test-tiny-vit/random-init dim 32"),
    "model-weights-unavailable": (lambda r: _set_model(r, pretrained="openai"), {},
                                  "Could not get the 'openai' weights for test-tiny-vit"),
}


@pytest.mark.parametrize("breaker", BREAKERS, ids=list(BREAKERS))
def test_broken_artifacts_keep_app_unready(make_client, artifacts, breaker, caplog):
    breaks, overrides, reason = BREAKERS[breaker]
    breaks(artifacts)
    with caplog.at_level("INFO", logger="app"):
        client = make_client(resources=None, artifacts_dir=artifacts, **overrides)
        r = wait_loaded(client)
    assert r.status_code == 503
    assert r.json()["ready"] is False
    assert reason in r.json()["reason"]
    assert not r.json()["reason"].startswith("unexpected")  # every fault here is one foreseen
    s = client.post("/search/text", json={"query": "red"})
    assert s.status_code == 503 and reason in s.json()["error"]["message"]
    assert client.get("/collections").status_code == 503
    errors = [rec for rec in caplog.records if rec.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None and "\n" not in errors[0].getMessage()
    assert reason in errors[0].getMessage()


def test_broken_second_collection_names_it(make_client, artifacts):
    """Discovered collections are all opened: a damaged one is named, not silently left out."""
    _second_collection(artifacts, "zz")
    _sql(artifacts, "UPDATE items SET vector = X'00' WHERE row = 1", name="zz")
    r = wait_loaded(make_client(resources=None, artifacts_dir=artifacts))
    assert r.status_code == 503
    assert r.json()["reason"].startswith("collection 'zz': catalog collections/zz/catalog.sqlite cannot be read")


def test_named_collections_must_be_names():
    """A name that is no folder name (`../x`) never reaches the file system: Settings refuses it,
    and so does load_resources for settings built around that check."""
    from pydantic import ValidationError

    from app.config import Settings

    with pytest.raises(ValidationError):
        Settings(collections="../etc")
    settings = Settings.model_construct(**{**Settings().model_dump(), "artifacts_dir": Path("."),
                                           "collections": ["../etc"]})
    with pytest.raises(ArtifactError, match="collection name '../etc' must be"):
        load_resources(settings)


# --- HNSW snapshots: used when current, ignored (and the index rebuilt) when stale or corrupt -------

def _search_matches_brute_force(res) -> None:
    store = res.store()
    ids = store.ids()
    vecs = np.stack([store.vector(i) for i in ids])
    for query in ("a red square", "stripes of gray with pink"):
        q = res.encoder.encode_texts([query])[0]
        scores = vecs @ q
        order = np.argsort(-scores, kind="stable")
        got = store.search(q, len(ids))
        assert [h.image_id for h in got] == [ids[i] for i in order]
        assert [h.score for h in got] == pytest.approx(scores[order].tolist(), abs=1e-5)


def test_hnsw_snapshot_current_stale_or_corrupt(artifacts, fakes, tmp_path, caplog):
    layout = ArtifactLayout(artifacts).collection("tiny")

    def save_snapshot() -> None:
        store = FaissStore.open(layout, readonly=False, exact_max=4)
        assert set(store.save_snapshot()) == {"images", "captions"}
        store.close()

    def load(**overrides) -> list[str]:
        """Load with CLIPSEARCH_EXACT_MAX=4; the store's log lines about snapshots."""
        caplog.clear()
        with caplog.at_level("INFO", logger="clipsearch.store"):
            res = load_resources(fakes.settings_for(tmp_path, artifacts_dir=artifacts, exact_max=4, **overrides))
        # 12 images and 33 captions are above exact_max=4: both targets are HNSW graphs
        assert res.store().describe()["index"] == {"images": "hnsw", "captions": "hnsw"}
        _search_matches_brute_force(res)
        return [rec.getMessage() for rec in caplog.records
                if rec.name.startswith("clipsearch.store") and "snapshot" in rec.getMessage()]

    save_snapshot()
    assert load() == []  # current: loaded as saved, nothing rebuilt

    with Catalog(layout.catalog) as catalog:  # a commit that changes no row: nothing to replay
        with catalog.transaction():
            pass
    assert load() == []
    with Catalog(layout.catalog) as catalog:  # a deletion after the snapshot: loaded, and replayed onto it
        catalog.delete(["00_solid_red.png"])
    logs = load()
    assert len(logs) == 1 and "snapshot loaded, 4 changes after it replayed" in logs[0], logs  # 1 image, 3 captions
    with Catalog(layout.catalog) as catalog:  # new caption offsets (hubness) change rows without their seq
        rows, _ = catalog.caption_vectors()
        catalog.set_caption_offsets(rows, np.zeros(len(rows), np.float32), None)
    logs = load()
    assert len(logs) == 2 and all("older than the catalog; rebuilding it" in m for m in logs), logs

    save_snapshot()
    assert load() == []
    faiss_file = next(layout.index_dir.glob("images.hnsw.*.faiss"))
    data = bytearray(faiss_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    faiss_file.write_bytes(bytes(data))
    logs = load()
    assert len(logs) == 1 and "images snapshot unusable" in logs[0] and "does not match its manifest" in logs[0]

    faiss_file.write_bytes(bytes(data[: len(data) // 3]))  # half-written, and the checksum not checked
    logs = load(verify_index_checksum=False)
    assert len(logs) == 1 and "images snapshot unusable" in logs[0], logs

    (layout.index_dir / "captions.hnsw.json").write_text('{"catalog_seq": ')
    logs = load(verify_index_checksum=False)
    assert len(logs) == 2 and any("captions snapshot unusable" in m and "corrupt JSON" in m for m in logs), logs


# --- fine-tuned checkpoints: recorded absolute path, relocation under ARTIFACTS_DIR/models, sha ---

@pytest.fixture(scope="module")
def checkpoint_artifacts(tmp_path_factory, dataset, fakes) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("ckpt")
    ckpt = base / "elsewhere" / "tiny-finetuned.pt"
    ckpt.parent.mkdir()
    torch.manual_seed(0)
    torch.save(load_model("test-tiny-vit", None, device="cpu").model.state_dict(), ckpt)
    return fakes.build_artifacts(base / "artifacts", dataset, pretrained=str(ckpt)), ckpt


def test_checkpoint_at_recorded_path(checkpoint_artifacts, fakes, tmp_path, dataset):
    root, ckpt = checkpoint_artifacts
    res = load_resources(fakes.settings_for(tmp_path, artifacts_dir=root))
    assert res.model["pretrained"] == str(ckpt.resolve())
    assert res.model["checkpoint_sha256"] == sha256_file(ckpt)
    # the query encoder is the model that embedded the collection (fixed weights: a random-init
    # model is drawn afresh on every load, so only a checkpoint makes vectors reproducible)
    images = dataset[0]
    store = res.store()
    vecs = res.encoder.encode_images([Image.open(r["image_path"]).convert("RGB") for r in images])
    stored = np.stack([store.vector(r["image_id"]) for r in images])
    # every image backend (torch, ONNX, the bf16 tower on an AMX CPU) is held to cosine >= 0.9999
    # against fp32 torch, whichever one embedded the collection
    assert (vecs * stored).sum(1).min() >= 0.9999
    # so an image of the collection finds itself first (image -> image), with cosine 1
    for i, row in enumerate(images):
        hits = store.search(vecs[i], 2)
        assert hits[0].image_id == row["image_id"] and hits[0].score == pytest.approx(1.0, abs=1e-4)


def test_checkpoint_relocated_under_models(checkpoint_artifacts, fakes, tmp_path):
    root, ckpt = checkpoint_artifacts
    copy = Path(shutil.copytree(root, tmp_path / "moved"))
    (copy / "models").mkdir()
    shutil.copy(ckpt, copy / "models" / ckpt.name)
    (copy / "models" / ckpt.name).touch()
    settings = fakes.settings_for(tmp_path, artifacts_dir=copy)
    # the recorded path still exists in this test, so point the catalog at a gone location
    _set_model(copy, pretrained=f"/gone/{ckpt.name}")
    res = load_resources(settings)
    assert res.model["checkpoint_sha256"] == sha256_file(ckpt)
    assert res.store().count() == 12

    # different weights under the same name: refused by sha256
    state = torch.load(ckpt, weights_only=True)
    state["logit_scale"] = state["logit_scale"] + 1.0
    torch.save(state, copy / "models" / ckpt.name)
    with pytest.raises(ModelLoadError, match="sha256"):
        load_resources(settings)

    (copy / "models" / ckpt.name).unlink()
    with pytest.raises(ModelLoadError, match="neither at its recorded path"):
        load_resources(settings)


def test_local_checkpoint_without_sha_is_refused(checkpoint_artifacts, fakes, tmp_path):
    root, _ = checkpoint_artifacts
    copy = Path(shutil.copytree(root, tmp_path / "nosha"))
    _set_model(copy, checkpoint_sha256=None)
    with pytest.raises(ArtifactError, match="names checkpoint tiny-finetuned.pt without its checkpoint_sha256"):
        load_resources(fakes.settings_for(tmp_path, artifacts_dir=copy))
