"""What is particular to QdrantStore (the shared behaviour is in test_store_contract.py): the mapping
onto Qdrant (ids, collections, metadata), store specs, threads sharing a local-mode client, and an
images collection made before image offsets existed."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from clipsearch.store import StoreError, check_store_spec, qdrant_location
from clipsearch.store.catalog import NewItem
from clipsearch.store.qdrant_store import (POOL, QdrantLocation, QdrantStore, caption_point_id, facet_key,
                                           image_point_id, list_collections)


def test_store_specs():
    assert check_store_spec("faiss") == "faiss" and qdrant_location("faiss") is None
    assert qdrant_location("qdrant:/data/q") == QdrantLocation(path="/data/q")
    assert qdrant_location("http://qdrant:6333", "k") == QdrantLocation(url="http://qdrant:6333", api_key="k")
    assert qdrant_location("https://x.cloud:6333", "") == QdrantLocation(url="https://x.cloud:6333")
    for bad in ("", "qdrant:", "http://", "redis://x", "FAISS"):
        with pytest.raises(ValueError):
            check_store_spec(bad)


def test_ids_and_facets_are_deterministic():
    assert image_point_id("a.jpg") == image_point_id("a.jpg") != image_point_id("b.jpg")
    assert caption_point_id("a.jpg#0") != image_point_id("a.jpg#0")
    assert facet_key("year", 2020) == facet_key("year", 2020.0) == "year=n:2020.0"
    assert facet_key("flag", True) == "flag=b:true" != facet_key("flag", 1)
    assert facet_key("kind", "1") == "kind=s:1" != facet_key("kind", 1)
    assert facet_key("tags", ["x"]) is None and facet_key("x", None) is None


def test_layout_in_qdrant_and_discovery(tmp_path, contract):
    location = QdrantLocation(path=str(tmp_path / "q"))
    store = QdrantStore.create(location, "photos", contract.MODEL, contract.DIM)
    try:
        store.add(contract.make_items())
        names = {c.name for c in store.client.get_collections().collections}
        assert names == {"photos__images", "photos__captions"}
        store.client.create_collection("someone_else__images", vectors_config=None)  # not ours: no metadata
        meta = store.client.get_collection("photos__images").config.metadata
        assert meta["model"] == contract.MODEL and meta["dim"] == contract.DIM and meta["seq"] >= 1
        caption_dim = store.client.get_collection("photos__captions").config.params.vectors.size
        image_dim = store.client.get_collection("photos__images").config.params.vectors.size
        assert caption_dim == image_dim == contract.DIM + 1  # the offset column
        assert store.image_offsets
        assert list_collections(location) == ["photos"]
        with pytest.raises(Exception, match="already exists"):
            QdrantStore.create(location, "photos", contract.MODEL, contract.DIM)
    finally:
        store.close()


def test_threads_share_one_local_client(tmp_path, contract):
    """Searches from several threads beside a writer, as the service's worker threads do."""
    location = QdrantLocation(path=str(tmp_path / "q"))
    store = QdrantStore.create(location, "c", contract.MODEL, contract.DIM)
    reader = QdrantStore.open(location, "c")  # a second store on the folder shares the client
    items = contract.make_items()
    store.add(items)
    errors: list[BaseException] = []
    queries = contract.unit(np.random.default_rng(0), 20)

    def search() -> None:
        try:
            for q in queries:
                hits = reader.search(q, 5, target="captions")
                assert len(hits) == 5
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=search) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(5):
        store.add([items[i]])
    for t in threads:
        t.join()
    try:
        assert errors == []
        assert reader.refresh() and reader.version == store.version  # it sees the writer's writes
    finally:
        store.close()
        reader.close()
    assert location not in POOL._clients  # noqa: SLF001 - the last close released the client


def test_images_collection_from_before_image_offsets_still_serves(tmp_path, contract):
    location = QdrantLocation(path=str(tmp_path / "q"))
    contract.make_pre_offset_images(location, "old")
    store = QdrantStore.open(location, "old", readonly=False)
    try:
        assert not store.image_offsets
        items = contract.make_items()
        store.add(items)  # offsets 0: fine
        q = contract.unit(np.random.default_rng(3), 1)[0]
        want = sorted((float(it.vector @ q), it.image_id) for it in items)[::-1]
        for hubness in (True, False):
            hits = store.search(q, 8, hubness=hubness)
            assert [h.image_id for h in hits] == [w[1] for w in want]
            assert [h.score for h in hits] == [h.cosine for h in hits] == pytest.approx([w[0] for w in want], abs=1e-5)
        np.testing.assert_allclose(store.vector("img2.jpg"), items[2].vector, atol=1e-6)
        assert store.search(items[1].caption_vectors[0], 1, target="captions")[0].caption_id == "img1.jpg#0"
        with pytest.raises(StoreError, match="offline migrate --collection old"):
            store.add([NewItem("new.jpg", "/n.jpg", items[0].vector, offset=-0.1)])
        assert store.get("new.jpg") is None and store.count() == 8
    finally:
        store.close()
