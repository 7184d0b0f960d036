"""The `VectorStore` contract, one suite run on FaissStore and on QdrantStore (local mode, on disk).

Expected answers are computed here by brute force from the items' vectors (numpy), never taken from
either backend, so both are checked against the same truth; the last test checks they agree with
each other hit for hit on the same data.
"""

from __future__ import annotations

import numpy as np
import pytest

from clipsearch.store import StoreError, VectorStore
from clipsearch.store.catalog import NewItem


def _expected(items: list[NewItem], q: np.ndarray, target: str = "images", keep=lambda it: True,
              offsets: dict[str, float] | None = None) -> list[tuple[str, str | None, float, float]]:
    """(image_id, caption_id, score, cosine) ranked by score, by brute force."""
    rows = []
    for it in items:
        if not keep(it):
            continue
        if target == "images":
            c = float(it.vector @ q)
            rows.append((it.image_id, None, c, c))
        else:
            for j, v in enumerate(it.caption_vectors if it.captions else []):
                cid = f"{it.image_id}#{j}"
                c = float(v @ q)
                rows.append((it.image_id, cid, c + (offsets or {}).get(cid, 0.0), c))
    return sorted(rows, key=lambda r: -r[2])


def _hits(store, q, k=100, **kw):
    return [(h.image_id, h.caption_id, h.score, h.cosine) for h in store.search(q, k, **kw)]


def _assert_ranked(hits, expected):
    assert [(h[0], h[1]) for h in hits] == [(e[0], e[1]) for e in expected]
    for h, e in zip(hits, expected):
        assert h[2] == pytest.approx(e[2], abs=1e-5) and h[3] == pytest.approx(e[3], abs=1e-5)


@pytest.fixture
def filled(backend, contract):
    store = backend.create()
    items = contract.make_items()
    store.add(items)
    return store, items


def test_is_a_vector_store(filled):
    store, _ = filled
    assert isinstance(store, VectorStore)


def test_get_many_is_get_for_each_id_in_order(filled):
    """A page of results reads its items in one call: the same items, in order, None where unknown."""
    store, items = filled
    ids = [items[5].image_id, "nope.jpg", items[0].image_id, items[5].image_id]
    assert store.get_many(ids) == [store.get(i) for i in ids]
    assert store.get_many(ids)[1] is None and store.get_many([]) == []


def test_capabilities_are_declared_not_probed(filled):
    """What a service asks of a store is on the contract: writable, compacts (then stats for the
    compaction policy), the corrections' records, close."""
    store, _ = filled
    assert store.writable is True
    assert isinstance(store.compacts, bool)
    stats = store.stats()
    if store.compacts:
        assert stats is not None and {"live", "tombstones", "delta"} <= set(stats["images"])
    assert store.hubness is None and store.hubness_images is None  # made without a correction


def test_add_count_ids_get_vector(filled, contract):
    store, items = filled
    assert store.count("images") == 8
    assert store.count("captions") == sum(len(it.captions) for it in items)
    assert store.ids() == [it.image_id for it in items]
    item = store.get("img3.jpg")
    assert item.image_id == "img3.jpg" and item.path == "/data/img3.jpg"
    assert item.captions == items[3].captions
    assert dict(item.metadata) == dict(items[3].metadata)
    np.testing.assert_allclose(store.vector("img3.jpg"), items[3].vector, atol=1e-6)
    assert store.get("nope.jpg") is None and store.vector("nope.jpg") is None
    assert store.dim == contract.DIM and dict(store.model) == contract.MODEL


def test_add_upserts_by_image_id(filled, contract):
    store, items = filled
    rng = np.random.default_rng(7)
    new = NewItem("img3.jpg", "/elsewhere/img3.jpg", contract.unit(rng, 1)[0], captions=("only one",),
                  caption_vectors=contract.unit(rng, 1), metadata={"kind": "fish"})
    store.add([new])
    assert store.count("images") == 8
    assert store.count("captions") == sum(len(it.captions) for it in items) - 3 + 1
    assert store.get("img3.jpg").captions == ("only one",)
    assert dict(store.get("img3.jpg").metadata) == {"kind": "fish"}
    # the replaced item moves to the end of the insertion order, as a catalog row does
    assert store.ids() == [it.image_id for it in items if it.image_id != "img3.jpg"] + ["img3.jpg"]
    np.testing.assert_allclose(store.vector("img3.jpg"), new.vector, atol=1e-6)
    hits = store.search(new.caption_vectors[0], 50, target="captions")
    assert [h.caption for h in hits if h.image_id == "img3.jpg"] == ["only one"]


def test_delete(filled, contract):
    store, items = filled
    assert store.delete(["img1.jpg", "img3.jpg", "missing.jpg"]) == 2
    assert store.delete([]) == 0
    assert store.count("images") == 6
    assert store.count("captions") == sum(len(it.captions) for it in items) - 1 - 3
    assert store.get("img1.jpg") is None
    q = items[3].vector
    assert {h.image_id for h in store.search(q, 100)} == {it.image_id for it in items} - {"img1.jpg", "img3.jpg"}
    assert all(h.image_id not in ("img1.jpg", "img3.jpg") for h in store.search(q, 100, target="captions"))


def test_replace_captions(filled, contract):
    store, items = filled
    rng = np.random.default_rng(3)
    vecs = contract.unit(rng, 2)
    store.replace_captions("img2.jpg", ["new a", "new b"], vecs)
    assert store.get("img2.jpg").captions == ("new a", "new b")
    np.testing.assert_allclose(store.vector("img2.jpg"), items[2].vector, atol=1e-6)  # the image vector stays
    top = store.search(vecs[1], 1, target="captions")[0]
    assert (top.image_id, top.caption_id, top.caption) == ("img2.jpg", "img2.jpg#1", "new b")
    assert top.cosine == pytest.approx(1.0, abs=1e-5)
    assert store.count("captions") == sum(len(it.captions) for it in items) - 2 + 2
    with pytest.raises(StoreError):
        store.replace_captions("missing.jpg", ["x"], vecs[:1])


def test_search_images_ranks_by_cosine(filled, contract):
    store, items = filled
    for q in contract.unit(np.random.default_rng(11), 3):
        _assert_ranked(_hits(store, q), _expected(items, q))
    top = store.search(items[5].vector, 1)[0]
    assert top.image_id == "img5.jpg" and top.caption_id is None and top.score == pytest.approx(1.0, abs=1e-5)


def test_search_captions_honours_hubness_offsets(backend, filled, contract):
    store, items = filled
    q = contract.unit(np.random.default_rng(5), 1)[0]
    plain = _expected(items, q, "captions")
    _assert_ranked(_hits(store, q, target="captions"), plain)
    # push the best caption to the bottom and lift the worst to the top
    offsets = {plain[0][1]: -3.0, plain[-1][1]: +3.0, plain[1][1]: 0.01}
    backend.set_offsets(store, items, offsets)
    expected = _expected(items, q, "captions", offsets=offsets)
    assert expected[0][1] == plain[-1][1] and expected[-1][1] == plain[0][1]
    hits = store.search(q, 100, target="captions")
    _assert_ranked([(h.image_id, h.caption_id, h.score, h.cosine) for h in hits], expected)
    assert all(h.caption == store.get(h.image_id).captions[int(h.caption_id.split("#")[1])] for h in hits)
    assert store.describe()["hubness"] == {"beta": 0.5}


@pytest.mark.parametrize("target", ["images", "captions"])
def test_filters(filled, contract, target):
    store, items = filled
    q = contract.unit(np.random.default_rng(2), 1)[0]

    def check(flt, keep):
        expected = _expected(items, q, target, keep)
        _assert_ranked(_hits(store, q, target=target, filter=flt), expected)
        return expected

    assert check({"kind": "cat"}, lambda it: it.metadata["kind"] == "cat")
    assert check({"kind": ["cat", "bird"]}, lambda it: it.metadata["kind"] in ("cat", "bird"))
    assert check({"kind": "dog", "year": 2021}, lambda it: it.metadata["kind"] == "dog" and it.metadata["year"] == 2021)
    # numbers by value: 1 == 1.0 (the items hold both), 2020.0 finds the int 2020
    one = check({"score": 1.0}, lambda it: it.metadata["score"] in (1, 1.0) and not isinstance(it.metadata["score"], bool))
    assert {it.image_id for it in items if it.metadata["score"] == 1} >= {e[0] for e in one}
    assert check({"score": 1}, lambda it: it.metadata["score"] == 1) == one
    assert check({"year": 2020.0}, lambda it: it.metadata["year"] == 2020)
    # booleans are not numbers: True finds the True flags, not the 1 of img7
    flags = check({"flag": True}, lambda it: it.metadata["flag"] is True)
    assert "img7.jpg" not in {e[0] for e in flags}
    ones = check({"flag": 1}, lambda it: it.metadata["flag"] == 1 and not isinstance(it.metadata["flag"], bool))
    assert {e[0] for e in ones} == {"img7.jpg"}  # img7 has 3 captions, so both targets hold it
    # strings are not numbers either; unknown fields and values match nothing
    assert store.search(q, 10, target=target, filter={"year": "2020"}) == []
    assert store.search(q, 10, target=target, filter={"nope": "x"}) == []
    assert store.search(q, 10, target=target, filter={"kind": "fish"}) == []
    for bad in ({"kind": None}, {"kind": []}, {"tags": [["x"]]}, {"kind": {"a": 1}}):
        with pytest.raises(StoreError):
            store.search(q, 10, target=target, filter=bad)


@pytest.mark.parametrize("target", ["images", "captions"])
def test_offset_pages_min_score_exclude(filled, contract, target):
    store, items = filled
    q = contract.unit(np.random.default_rng(9), 1)[0]
    full = _expected(items, q, target)
    pages = [h for off in range(0, len(full) + 3, 3) for h in _hits(store, q, 3, target=target, offset=off)]
    _assert_ranked(pages, full)
    assert store.search(q, 3, target=target, offset=len(full)) == []
    assert store.search(q, 0, target=target) == []
    # min_score: exactly the hits at or above it, between two scores so float rounding cannot matter
    cut = (full[3][2] + full[4][2]) / 2
    _assert_ranked(_hits(store, q, target=target, min_score=cut), full[:4])
    _assert_ranked(_hits(store, q, 2, target=target, offset=2, min_score=cut), full[2:4])
    gone = {full[0][0], "missing.jpg"}
    _assert_ranked(_hits(store, q, target=target, exclude=list(gone)), [e for e in full if e[0] not in gone])
    both = _hits(store, q, target=target, exclude=[full[0][0]], filter={"kind": ["cat", "dog"]})
    _assert_ranked(both, [e for e in full if e[0] != full[0][0] and
                          store.get(e[0]).metadata["kind"] in ("cat", "dog")])


def test_version_changes_on_every_write(filled, contract):
    store, items = filled
    seen = [store.version]
    assert store.version == seen[0]  # reads do not move it
    store.search(items[0].vector, 3)
    store.describe()
    assert store.version == seen[0]
    rng = np.random.default_rng(4)
    writes = [
        lambda: store.add([NewItem("new.jpg", "/n.jpg", contract.unit(rng, 1)[0])]),
        lambda: store.add([NewItem("new.jpg", "/n2.jpg", contract.unit(rng, 1)[0])]),
        lambda: store.replace_captions("new.jpg", ["c"], contract.unit(rng, 1)),
        lambda: store.delete(["new.jpg"]),
    ]
    for write in writes:
        write()
        assert store.version not in seen
        seen.append(store.version)


def test_describe(filled, contract):
    store, items = filled
    d = store.describe()
    assert {"name", "images", "captions", "model", "index", "version", "hubness", "hubness_images",
            "metadata_fields"} <= set(d)
    assert d["images"] == 8 and d["captions"] == store.count("captions") and d["model"] == contract.MODEL
    assert d["version"] == store.version and d["hubness"] is None and d["hubness_images"] is None
    assert set(d["index"]) == {"images", "captions"}
    fields = d["metadata_fields"]
    assert fields["kind"] == ["bird", "cat", "dog"]
    assert fields["year"] == [2020, 2021, 2022]
    assert sorted(fields["flag"], key=str) == sorted([False, True, 1], key=str)
    assert "tags" not in fields  # a list is no filter choice
    assert len(fields["uid"]) == 8


def test_dimension_mismatch_is_refused(filled, contract):
    store, _ = filled
    with pytest.raises(StoreError):
        store.search(np.ones(contract.DIM + 1, np.float32), 3)
    with pytest.raises(ValueError):  # FaissStore's catalog raises ValueError, QdrantStore StoreError (a ValueError)
        store.add([NewItem("bad.jpg", "/b.jpg", np.ones(contract.DIM - 1, np.float32))])
    with pytest.raises(ValueError):
        store.add([NewItem("bad.jpg", "/b.jpg", np.ones(contract.DIM, np.float32), captions=("a",),
                           caption_vectors=np.ones((1, contract.DIM + 2), np.float32))])
    with pytest.raises(ValueError):
        store.add([NewItem("bad.jpg", "/b.jpg", np.full(contract.DIM, np.nan, np.float32))])
    assert store.get("bad.jpg") is None and store.count() == 8


def test_reopen_from_disk_keeps_everything(backend, filled, contract):
    store, items = filled
    offsets = {"img3.jpg#2": 0.5}
    backend.set_offsets(store, items, offsets)
    q = contract.unit(np.random.default_rng(8), 1)[0]
    before = {"ids": store.ids(), "describe": store.describe(), "version": store.version,
              "images": _hits(store, q), "captions": _hits(store, q, target="captions"),
              "get": store.get("img3.jpg"), "vector": store.vector("img3.jpg")}
    again = backend.reopen(store)
    assert again.ids() == before["ids"] and again.version == before["version"]
    assert again.describe() == before["describe"]
    assert again.get("img3.jpg") == before["get"]
    np.testing.assert_array_equal(again.vector("img3.jpg"), before["vector"])
    _assert_ranked(_hits(again, q), before["images"])
    _assert_ranked(_hits(again, q, target="captions"), before["captions"])
    _assert_ranked(before["captions"], _expected(items, q, "captions", offsets=offsets))


def test_backends_agree_hit_for_hit(tmp_path, contract):
    """The same items and offsets in both stores give the same hits, scores and order."""
    stores = []
    items = contract.make_items(seed=21)
    rng = np.random.default_rng(21)
    offsets = {f"img{i}.jpg#{j}": float(o) for i in range(8) for j, o in enumerate(rng.normal(0, 0.1, 3))}
    made = []
    for kind in ("faiss", "qdrant"):
        b = contract.backends[kind](tmp_path / kind)
        made.append(b)
        s = b.create()
        s.add(items)
        b.set_offsets(s, items, offsets)
        stores.append(s)
    try:
        for q in contract.unit(rng, 5):
            for target in ("images", "captions"):
                for kw in ({}, {"filter": {"kind": ["dog", "bird"]}}, {"offset": 2, "exclude": ["img0.jpg"]},
                           {"filter": {"flag": False}, "min_score": -0.2}):
                    a, b = (_hits(s, q, 7, target=target, **kw) for s in stores)
                    _assert_ranked(b, a)
        assert stores[0].describe()["metadata_fields"] == stores[1].describe()["metadata_fields"]
    finally:
        for b in made:
            b.close_all()
