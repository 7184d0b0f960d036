"""`offline migrate` (a catalog to Qdrant without re-embedding) and `offline ingest --store qdrant:PATH`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from clipsearch.artifacts import ArtifactLayout
from clipsearch.manifest import ArtifactError
from clipsearch.store import Catalog, FaissStore, NewItem, collection_names, open_store
from clipsearch.store.qdrant_store import QdrantLocation, QdrantStore
from offline.cli import main
from offline.migrate import migrate


@pytest.fixture
def on_disk(tmp_path, contract):
    """A FAISS collection `contract` under tmp_path/artifacts, with caption and image offsets and their
    hubness records."""
    layout = ArtifactLayout(tmp_path / "artifacts")
    items = contract.make_items(seed=3)
    with Catalog(layout.collection("contract").catalog) as cat:
        cat.set_model(contract.MODEL, contract.DIM)
        cat.put(items)
        rows, _ = cat.caption_vectors()
        cat.set_caption_offsets(rows, np.linspace(-0.2, 0.2, len(rows)).astype(np.float32), {"beta": 0.3})
        rows, _ = cat.image_vectors()
        cat.set_image_offsets(rows, np.linspace(0.3, -0.3, len(rows)).astype(np.float32), {"beta": 0.6})
    return layout, items


def _same_answers(a, b, q) -> None:
    for target, k, hubness in (("images", 8, True), ("captions", 20, True), ("images", 8, False),
                               ("captions", 20, False)):
        ha, hb = (s.search(q, k, target=target, hubness=hubness) for s in (a, b))
        assert [(h.image_id, h.caption_id, h.caption) for h in ha] == [(h.image_id, h.caption_id, h.caption) for h in hb]
        assert [x for h in ha for x in (h.score, h.cosine)] == pytest.approx(
            [x for h in hb for x in (h.score, h.cosine)], abs=1e-5)


def test_migrate_copies_everything_and_is_idempotent(on_disk, tmp_path, contract):
    layout, items = on_disk
    spec = f"qdrant:{tmp_path / 'q'}"
    first = migrate(str(layout.root), "contract", spec, progress=False)
    assert (first["copied_items"], first["images"], first["captions"], first["up_to_date"]) == (8, 8, 12, False)
    assert migrate(str(layout.root), "contract", spec, progress=False)["up_to_date"]
    faiss = FaissStore.open(layout.collection("contract"))
    qdrant = open_store(layout, "contract", store=spec)
    try:
        assert collection_names(layout, spec) == ["contract"]
        assert qdrant.model == faiss.model and qdrant.dim == faiss.dim
        assert qdrant.ids() == faiss.ids()
        assert qdrant.describe()["hubness"] == faiss.describe()["hubness"] == {"beta": 0.3}
        assert qdrant.describe()["hubness_images"] == faiss.describe()["hubness_images"] == {"beta": 0.6}
        # the image offsets came along: with them the ranking is not the plain cosine's
        q0 = items[0].vector
        assert ([h.image_id for h in qdrant.search(q0, 8)] != [h.image_id for h in qdrant.search(q0, 8, hubness=False)])
        assert qdrant.describe()["metadata_fields"] == faiss.describe()["metadata_fields"]
        for image_id in faiss.ids():
            assert qdrant.get(image_id) == faiss.get(image_id)
            np.testing.assert_array_equal(qdrant.vector(image_id), faiss.vector(image_id))
        for q in contract.unit(np.random.default_rng(1), 4):
            _same_answers(qdrant, faiss, q)
        version = qdrant.version
    finally:
        faiss.close()
        qdrant.close()
    # a change in the catalog: the next run upserts again and drops what the catalog lost
    with Catalog(layout.collection("contract").catalog) as cat:
        cat.delete(["img2.jpg"])
        cat.put([NewItem("extra.jpg", "/x.jpg", items[0].vector, metadata={"kind": "new"})])
    again = migrate(str(layout.root), "contract", spec, progress=False)
    assert (again["up_to_date"], again["removed_items"], again["images"]) == (False, 1, 8)
    store = QdrantStore.open(QdrantLocation(path=str(tmp_path / "q")), "contract")
    try:
        assert store.get("img2.jpg") is None and store.get("extra.jpg").metadata == {"kind": "new"}
        assert store.count("captions") == 12 - 2 and store.version != version
    finally:
        store.close()


def test_migrate_remakes_a_collection_from_before_image_offsets(on_disk, tmp_path, contract):
    layout, _ = on_disk
    location = QdrantLocation(path=str(tmp_path / "q"))
    contract.make_pre_offset_images(location, "contract")
    qdrant = QdrantStore.open(location, "contract")  # a reader open on the old layout meanwhile
    assert not qdrant.image_offsets
    done = migrate(str(layout.root), "contract", f"qdrant:{tmp_path / 'q'}", progress=False)
    assert (done["up_to_date"], done["images"]) == (False, 8)
    faiss = FaissStore.open(layout.collection("contract"))
    try:
        assert qdrant.refresh() and qdrant.image_offsets  # it follows the collection made afresh
        for q in contract.unit(np.random.default_rng(2), 3):
            _same_answers(qdrant, faiss, q)
    finally:
        qdrant.close()
        faiss.close()


def test_migrate_refuses_another_model_without_force(on_disk, tmp_path, contract):
    layout, _ = on_disk
    location = QdrantLocation(path=str(tmp_path / "q"))
    QdrantStore.create(location, "contract", {**contract.MODEL, "model": "other"}, contract.DIM).close()
    with pytest.raises(ArtifactError, match="--force"):
        migrate(str(layout.root), "contract", f"qdrant:{tmp_path / 'q'}", progress=False)
    done = migrate(str(layout.root), "contract", f"qdrant:{tmp_path / 'q'}", progress=False, force=True)
    assert done["images"] == 8


def test_open_store_errors_are_clear(tmp_path, contract):
    layout = ArtifactLayout(tmp_path / "artifacts")
    with pytest.raises(ArtifactError, match="offline migrate"):
        open_store(layout, "nothing", store=f"qdrant:{tmp_path / 'q'}")
    with pytest.raises(ValueError, match="faiss"):
        open_store(layout, "nothing", store="mysql://x")
    readonly = QdrantStore.create(QdrantLocation(path=str(tmp_path / "q")), "c", contract.MODEL, contract.DIM)
    readonly.close()
    store = QdrantStore.open(QdrantLocation(path=str(tmp_path / "q")), "c", readonly=True)
    try:
        with pytest.raises(ArtifactError, match="read-only"):
            store.add([NewItem("a.jpg", "/a.jpg", np.ones(contract.DIM, np.float32))])
    finally:
        store.close()


def test_cli_migrate_and_ingest_with_store(on_disk, tmp_path, capsys):
    layout, _ = on_disk
    spec = f"qdrant:{tmp_path / 'q'}"
    # placement options go to Qdrant's create_collection (local mode accepts and ignores them)
    assert main(["migrate", "--out", str(layout.root), "--collection", "contract", "--to", spec,
                 "--shards", "4", "--replicas", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 8 and out["qdrant_collections"] == {"images": "contract__images",
                                                                  "captions": "contract__captions"}
    assert main(["migrate", "--out", str(layout.root), "--collection", "missing", "--to", spec]) == 2
    assert "ingest it first" in capsys.readouterr().err
    # ingest --store: the catalog is ingested (incremental, as ever), then copied to Qdrant
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(src / f"p{i}.png")
        (src / f"p{i}.txt").write_text(f"photo number {i}\n")
    code = main(["ingest", str(src), "--out", str(layout.root), "--collection", "photos", "--store", spec,
                 "--model", "test-tiny-vit", "--pretrained", "none", "--image-backend", "torch",
                 "--text-backend", "torch", "--batch-size", "4", "--workers", "0"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    res = json.loads(printed[printed.index("\n{") + 1:])  # after ingest's one-line summary
    assert res["migrate"]["images"] == 3 and res["migrate"]["captions"] == 3
    assert collection_names(layout, spec) == ["contract", "photos"]
    store = open_store(layout, "photos", store=spec)
    faiss = FaissStore.open(layout.collection("photos"))
    try:
        q = faiss.vector("p1.png")
        assert [h.image_id for h in store.search(q, 3)] == [h.image_id for h in faiss.search(q, 3)]
        assert store.get("p1.png").captions == ("photo number 1",)
    finally:
        store.close()
        faiss.close()
