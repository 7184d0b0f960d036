"""The hubness offsets of the `VectorStore` contract, on FaissStore and QdrantStore alike: every image
and caption carries one; a search ranks by `cosine + offset` (hubness=True, the default) or by the
plain cosine (hubness=False), and `Hit.cosine` is always the plain cosine. The offsets are stored at
insert, set for the whole collection later (`set_image_offsets`), and survive reopen, delete, upsert.

Expected answers are computed here by brute force from the items' vectors and offsets.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from clipsearch.store.catalog import NewItem


def _expected(items: list[NewItem], q: np.ndarray, target: str = "images", *, image_offsets=None,
              caption_offsets=None, hubness: bool = True) -> list[tuple[str, str | None, float, float]]:
    """(image_id, caption_id, score, cosine) ranked by score (ties by insertion order, as both stores)."""
    rows = []
    for it in items:
        if target == "images":
            c = float(it.vector @ q)
            off = (image_offsets or {}).get(it.image_id, 0.0) if hubness else 0.0
            rows.append((it.image_id, None, c + off, c))
        else:
            for j, v in enumerate(it.caption_vectors if it.captions else []):
                cid = f"{it.image_id}#{j}"
                c = float(v @ q)
                off = (caption_offsets or {}).get(cid, 0.0) if hubness else 0.0
                rows.append((it.image_id, cid, c + off, c))
    return sorted(rows, key=lambda r: -r[2])


def _hits(store, q, k=100, **kw):
    return [(h.image_id, h.caption_id, h.score, h.cosine) for h in store.search(q, k, **kw)]


def _assert_ranked(hits, expected):
    assert [(h[0], h[1]) for h in hits] == [(e[0], e[1]) for e in expected]
    for h, e in zip(hits, expected):
        assert h[2] == pytest.approx(e[2], abs=1e-5) and h[3] == pytest.approx(e[3], abs=1e-5)


def _flip(plain: list[tuple[str, str | None, float, float]], key: int = 0) -> dict[str, float]:
    """Offsets that turn a ranking over: the best row to the bottom, the worst to the top."""
    return {plain[0][key]: -3.0, plain[-1][key]: +3.0, plain[1][key]: 0.01}


def _with_offsets(items, image_offsets=None, caption_offsets=None):
    out = []
    for it in items:
        caps = None
        if caption_offsets is not None and it.captions:
            caps = np.array([caption_offsets.get(f"{it.image_id}#{j}", 0.0) for j in range(len(it.captions))],
                            np.float32)
        out.append(replace(it, offset=(image_offsets or {}).get(it.image_id, 0.0), caption_offsets=caps))
    return out


def test_images_rank_by_cosine_plus_offset_given_at_add(backend, contract):
    store = backend.create()
    items = contract.make_items()
    q = contract.unit(np.random.default_rng(5), 1)[0]
    offsets = _flip(_expected(items, q))
    store.add(_with_offsets(items, image_offsets=offsets))
    expected = _expected(items, q, image_offsets=offsets)
    assert expected[0][0] == _expected(items, q)[-1][0]  # the offsets do turn the ranking over
    _assert_ranked(_hits(store, q), expected)
    # hubness=False: the plain cosine ranks, and the score is the cosine
    plain = _hits(store, q, hubness=False)
    _assert_ranked(plain, _expected(items, q))
    assert all(h[2] == h[3] for h in plain)
    # the same with pagination, a filter and a minimum score
    _assert_ranked(_hits(store, q, 3, offset=2, hubness=False), _expected(items, q)[2:5])
    _assert_ranked(_hits(store, q, filter={"kind": "cat"}),
                   [e for e in expected if store.get(e[0]).metadata["kind"] == "cat"])
    cut = (expected[2][2] + expected[3][2]) / 2
    _assert_ranked(_hits(store, q, min_score=cut), expected[:3])
    # an item duplicating the query is first without the correction, whatever its offset
    store.add([NewItem("dup.jpg", "/d.jpg", q, offset=-3.0)])
    assert store.search(q, 1, hubness=False)[0].image_id == "dup.jpg"
    assert store.search(q, 1)[0].image_id != "dup.jpg"
    np.testing.assert_allclose(store.vector("dup.jpg"), q, atol=1e-6)  # the vector, less any offset
    assert store.describe()["hubness_images"] is None  # offsets given at add: no collection-wide record


def test_captions_hubness_false_ranks_by_plain_cosine(backend, contract):
    store = backend.create()
    items = contract.make_items()
    q = contract.unit(np.random.default_rng(6), 1)[0]
    offsets = _flip(_expected(items, q, "captions"), key=1)
    store.add(items)
    backend.set_offsets(store, items, offsets)
    _assert_ranked(_hits(store, q, target="captions"), _expected(items, q, "captions", caption_offsets=offsets))
    plain = _hits(store, q, target="captions", hubness=False)
    _assert_ranked(plain, _expected(items, q, "captions"))
    assert all(h[2] == h[3] for h in plain)


def test_caption_offsets_given_at_add_and_replace_captions(backend, contract):
    store = backend.create()
    items = contract.make_items()
    q = contract.unit(np.random.default_rng(7), 1)[0]
    offsets = _flip(_expected(items, q, "captions"), key=1)
    store.add(_with_offsets(items, caption_offsets=offsets))
    _assert_ranked(_hits(store, q, target="captions"), _expected(items, q, "captions", caption_offsets=offsets))
    # new captions for img2, with their offsets: the new first caption is exactly the query
    rng = np.random.default_rng(8)
    vecs = np.vstack([q, contract.unit(rng, 1)])
    store.replace_captions("img2.jpg", ["the query", "another"], vecs, np.array([-2.0, 0.5], np.float32))
    items = [replace(it, captions=("the query", "another"), caption_vectors=vecs) if it.image_id == "img2.jpg"
             else it for it in items]
    offsets = {**{c: o for c, o in offsets.items() if not c.startswith("img2.jpg#")},
               "img2.jpg#0": -2.0, "img2.jpg#1": 0.5}
    _assert_ranked(_hits(store, q, target="captions"), _expected(items, q, "captions", caption_offsets=offsets))
    assert store.search(q, 1, target="captions", hubness=False)[0].caption_id == "img2.jpg#0"
    # without offsets the new captions get 0
    store.replace_captions("img2.jpg", ["plain"], q[None, :])
    mine = [h for h in store.search(q, 100, target="captions") if h.image_id == "img2.jpg"]
    assert [(h.caption_id, h.score, h.cosine) for h in mine] == [("img2.jpg#0", pytest.approx(1.0, abs=1e-5),
                                                                  pytest.approx(1.0, abs=1e-5))]
    with pytest.raises(ValueError):  # one offset per caption
        store.replace_captions("img2.jpg", ["a", "b"], vecs, np.zeros(3, np.float32))
    with pytest.raises(ValueError):
        store.add([replace(items[3], caption_offsets=np.zeros(1, np.float32))])  # img3 has 3 captions
    with pytest.raises(ValueError):
        store.add([replace(items[0], offset=float("nan"))])


def test_set_image_offsets_is_picked_up_by_an_open_reader(backend, contract):
    store = backend.create()
    items = contract.make_items()
    store.add(items)
    reader = backend.reader(store)
    q = contract.unit(np.random.default_rng(9), 1)[0]
    _assert_ranked(_hits(reader, q), _expected(items, q))
    offsets = _flip(_expected(items, q))
    backend.set_image_offsets(store, items, offsets)
    assert reader.refresh()
    expected = _expected(items, q, image_offsets=offsets)
    _assert_ranked(_hits(reader, q), expected)
    _assert_ranked(_hits(reader, q, hubness=False), _expected(items, q))
    assert reader.describe()["hubness_images"] == store.describe()["hubness_images"] == {"beta": 0.25}
    # and again, with other offsets: the last ones count, the earlier ones are gone
    again = {items[4].image_id: 2.0}
    backend.set_image_offsets(store, items, again)
    assert reader.refresh()
    _assert_ranked(_hits(reader, q), _expected(items, q, image_offsets=again))


def test_image_offsets_survive_delete_upsert_and_reopen(backend, contract):
    store = backend.create()
    items = contract.make_items()
    q = contract.unit(np.random.default_rng(10), 1)[0]
    offsets = _flip(_expected(items, q))
    store.add(_with_offsets(items, image_offsets=offsets))
    victim = _expected(items, q)[2][0]
    assert store.delete([victim]) == 1
    moved = replace(items[5], vector=contract.unit(np.random.default_rng(11), 1)[0])
    store.add([replace(moved, offset=0.7)])  # an upsert with a new vector and offset
    items = [moved if it.image_id == moved.image_id else it for it in items if it.image_id != victim]
    offsets = {**offsets, moved.image_id: 0.7}
    offsets.pop(victim, None)
    expected = _expected(items, q, image_offsets=offsets)
    _assert_ranked(_hits(store, q), expected)
    again = backend.reopen(store)
    _assert_ranked(_hits(again, q), expected)
    _assert_ranked(_hits(again, q, hubness=False), _expected(items, q))
