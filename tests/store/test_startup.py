"""Start-up from current snapshots (clipsearch/store/startup.py) gives the state the general path gives.

Each case writes a collection, compacts it (the snapshot then reflects the last commit), and opens it
twice: once as the service does (the fast path where it applies) and once through `_build_full`
alone; the two states must agree in every field, and searches must answer the same.
"""

from __future__ import annotations

import numpy as np
import pytest

from clipsearch.artifacts import ArtifactLayout
from clipsearch.store import Catalog, FaissStore, NewItem
from clipsearch.store.startup import current_snapshot_state, storage_vectors
from tests.store.conftest import DIM, make_items, unit  # the contract tests' collection

EXACT_MAX = 5  # every target of these small collections gets an HNSW snapshot
MODEL = {"model": "fake-startup", "pretrained": None, "checkpoint_sha256": None, "embed_dim": DIM}


def _collection(tmp_path, n_extra: int = 40, seed: int = 0) -> tuple[ArtifactLayout, FaissStore]:
    layout = ArtifactLayout(tmp_path).collection("c")
    with Catalog(layout.catalog) as cat:
        cat.set_model(MODEL, MODEL["embed_dim"])
    store = FaissStore.open(layout, readonly=False, exact_max=EXACT_MAX)
    rng = np.random.default_rng(seed)
    items = make_items(seed)
    for i in range(n_extra):  # more items, some without captions, metadata with one shared field
        caps = tuple(f"extra {i} caption {j}" for j in range(i % 3))
        items.append(NewItem(f"x{i}", f"/data/x{i}.jpg", unit(rng, 1)[0], captions=caps,
                             caption_vectors=unit(rng, len(caps)) if caps else None,
                             metadata={"kind": ["cat", "dog"][i % 2], "n": i}))
    store.add(items)
    return layout, store


def _general(layout) -> FaissStore:
    store = FaissStore.open(layout, readonly=True, exact_max=EXACT_MAX)
    store._live = store._build_full()  # start=False: never the fast path
    return store


def _assert_same_state(a: FaissStore, b: FaissStore) -> None:
    la, lb = a._current(), b._current()
    assert (la.dim, la.seq, la.uid, la.hubness) == (lb.dim, lb.seq, lb.uid, lb.hubness)
    assert la.image_ids == lb.image_ids and list(la.items) == list(lb.items) and la.row_of == lb.row_of
    assert la.caption_ids == lb.caption_ids and la.caption_texts == lb.caption_texts
    assert la.captions_of == lb.captions_of
    assert la.facets == lb.facets and la.originals == lb.originals
    for t in ("images", "captions"):
        ta, tb = la.targets[t], lb.targets[t]
        assert (ta.n, ta.dead, ta.has_offsets, ta.index_seq) == (tb.n, tb.dead, tb.has_offsets, tb.index_seq)
        assert ta.index_ids == tb.index_ids
        np.testing.assert_array_equal(ta.vectors[: ta.n], tb.vectors[: tb.n])
        np.testing.assert_array_equal(ta.alive[: ta.n], tb.alive[: tb.n])
        np.testing.assert_array_equal(ta.image_rows[: ta.n], tb.image_rows[: tb.n])
        if ta.has_offsets:
            np.testing.assert_array_equal(ta.offsets[: ta.n], tb.offsets[: tb.n])
        assert (ta.index is None) == (tb.index is None)
    assert a.describe() == b.describe()


def _same_answers(a: FaissStore, b: FaissStore, seed: int = 5) -> None:
    rng = np.random.default_rng(seed)
    for q in unit(rng, 4):
        for target in ("images", "captions"):
            for flt in (None, {"kind": "cat"}):
                assert a.search(q, 7, target=target, filter=flt) == b.search(q, 7, target=target, filter=flt)


def test_current_snapshots_give_the_general_state(tmp_path):
    layout, writer = _collection(tmp_path)
    writer.compact()
    writer.close()
    fast = FaissStore.open(layout, readonly=True, exact_max=EXACT_MAX)
    assert current_snapshot_state(fast) is not None  # the fast path applies here
    general = _general(layout)
    _assert_same_state(fast, general)
    _same_answers(fast, general)
    images = fast._current().targets["images"]
    assert not images.vectors.flags.writeable  # a view of the graph's storage, never written


def test_writes_after_a_fast_start_append_beyond_the_shared_storage(tmp_path):
    layout, writer = _collection(tmp_path)
    writer.compact()
    writer.close()
    store = FaissStore.open(layout, readonly=False, exact_max=EXACT_MAX)
    rng = np.random.default_rng(9)
    before = store.vector("img3.jpg")
    store.add([NewItem("new", "/data/new.jpg", unit(rng, 1)[0], captions=("a new caption",),
                       caption_vectors=unit(rng, 1), metadata={"kind": "bird"})])
    store.delete(["img1.jpg"])
    np.testing.assert_array_equal(store.vector("img3.jpg"), before)
    assert store.get("new") is not None and store.get("img1.jpg") is None
    hits = store.search(store.vector("new"), 3)
    assert hits[0].image_id == "new" and all(h.image_id != "img1.jpg" for h in store.search(before, 60))
    assert store.compact()["compacted"]
    general = _general(layout)
    _same_answers(store, general)


def test_caption_offsets_come_through(tmp_path):
    layout, writer = _collection(tmp_path)
    rows, _ = writer.catalog.caption_vectors()
    offsets = np.linspace(-0.2, 0.2, len(rows)).astype(np.float32)
    writer.catalog.set_caption_offsets(rows, offsets, {"method": "test"})
    writer.refresh()
    writer.compact()
    writer.close()
    fast = FaissStore.open(layout, readonly=True, exact_max=EXACT_MAX)
    assert current_snapshot_state(fast) is not None
    general = _general(layout)
    assert fast._current().targets["captions"].has_offsets
    _assert_same_state(fast, general)
    _same_answers(fast, general)


@pytest.mark.parametrize("change", ["add", "delete", "recaption"])
def test_a_change_after_the_snapshot_takes_the_general_path(tmp_path, change):
    layout, writer = _collection(tmp_path)
    writer.compact()
    rng = np.random.default_rng(3)
    if change == "add":
        writer.add([NewItem("late", "/data/late.jpg", unit(rng, 1)[0], metadata={"kind": "cat"})])
    elif change == "delete":
        writer.delete(["img2.jpg"])
    else:
        writer.replace_captions("img5.jpg", ["new words"], unit(rng, 1))
    writer.close()
    store = FaissStore.open(layout, readonly=True, exact_max=EXACT_MAX)
    assert current_snapshot_state(store) is None
    assert store.stats()["replayed_at_start"] >= 1  # replayed onto the snapshot, as before


def test_without_snapshot_or_small_targets_nothing_changes(tmp_path):
    layout, writer = _collection(tmp_path, n_extra=0)
    writer.close()  # no compaction: no snapshot
    store = FaissStore.open(layout, readonly=True, exact_max=EXACT_MAX)
    assert current_snapshot_state(store) is None
    small = FaissStore.open(layout, readonly=True, exact_max=10_000)  # exact targets need no snapshot
    assert current_snapshot_state(small) is not None
    ref = FaissStore.open(layout, readonly=True, exact_max=10_000)
    ref._live = ref._build_full()
    _assert_same_state(small, ref)
    _same_answers(small, ref)


def test_storage_vectors_keep_the_index_alive():
    from clipsearch.index import IndexParams, VectorIndex

    rng = np.random.default_rng(1)
    x = unit(rng, 50)
    index = VectorIndex.build(x, IndexParams("hnsw", 8, 20, 20))
    view = storage_vectors(index)
    del index
    import gc

    gc.collect()
    np.testing.assert_array_equal(view, x)
    assert storage_vectors(VectorIndex.build(x, IndexParams("flat"))) is None


def test_lazy_items_behave_as_the_list_they_replace():
    from clipsearch.store.base import Item
    from clipsearch.store.startup import LazyItems

    items = LazyItems(["a", "b"], ["/a", "/b"], [{"k": 1}, {}], {1: ["cap"]})
    assert len(items) == 2 and items[0] == Item("a", "/a", (), {"k": 1}) and items[-1] == Item("b", "/b", ("cap",), {})
    items.append(Item("c", "/c"))
    items[0] = None
    items[2] = Item("c2", "/c2")
    assert list(items) == [None, Item("b", "/b", ("cap",), {}), Item("c2", "/c2")]
    with pytest.raises(IndexError):
        items[3]
    with pytest.raises(IndexError):
        items[-4]


@pytest.mark.skipif(not hasattr(Catalog, "set_image_offsets"), reason="a catalog without per-image offsets")
def test_image_offsets_come_through(tmp_path):
    layout, writer = _collection(tmp_path)
    rows, _ = writer.catalog.image_vectors()
    writer.catalog.set_image_offsets(rows, np.linspace(-0.1, 0.1, len(rows)).astype(np.float32), {"method": "test"})
    writer.refresh()
    writer.compact()
    writer.close()
    fast = FaissStore.open(layout, readonly=True, exact_max=EXACT_MAX)
    assert current_snapshot_state(fast) is not None
    general = _general(layout)
    assert fast._current().targets["images"].has_offsets
    _assert_same_state(fast, general)
    _same_answers(fast, general)
