"""`clipsearch.collection.Collection`, the one write path: offsets from the banks in one product per
chunk, committed through the store; a served collection takes only the corrections it was built with."""

from __future__ import annotations

import numpy as np

from clipsearch.collection import Collection, split_rows
from clipsearch.hubness import Banks, Correction
from clipsearch.store import FaissStore, NewItem

DIM = 8
MODEL = {"model": "fake-collection", "pretrained": None, "checkpoint_sha256": None, "embed_dim": DIM}


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _banks(rng: np.random.Generator) -> Banks:
    info = {"beta": 0.5, "k": 3}
    return Banks(Correction("captions", 0.5, 3, _unit(rng, 20), {**info, "gallery": "captions"}),
                 Correction("images", 0.5, 3, _unit(rng, 20), {**info, "gallery": "images"}))


def _items(rng: np.random.Generator) -> list[NewItem]:
    caps = [2, 0, 3]
    return [NewItem(f"i{i}.jpg", f"/data/i{i}.jpg", _unit(rng, 1)[0], captions=tuple(f"c{i}{j}" for j in range(n)),
                    caption_vectors=_unit(rng, n) if n else None) for i, n in enumerate(caps)]


def test_split_rows():
    flat = np.arange(5, dtype=np.float32)
    parts = split_rows(flat, [2, None, 3])
    assert parts[1] is None and list(parts[0]) == [0, 1] and list(parts[2]) == [2, 3, 4]


def test_add_embedded_gives_each_row_its_banks_offsets():
    rng = np.random.default_rng(0)
    banks, items = _banks(rng), _items(rng)
    store = FaissStore.in_memory("c", MODEL, DIM)
    Collection(store, banks).add_embedded(items)
    rows = store.catalog.rows()
    for r, item in enumerate(items):
        assert rows.image_ids[r] == item.image_id
        np.testing.assert_allclose(rows.image_offsets[r], banks.image_offsets(item.vector[None])[0], atol=1e-6)
    caps = np.concatenate([i.caption_vectors for i in items if i.captions])
    np.testing.assert_allclose(rows.caption_offsets, banks.caption_offsets(caps), atol=1e-6)
    assert np.all(rows.image_offsets != 0) and np.all(rows.caption_offsets != 0)


def test_keep_offsets_copies_them_and_replace_captions_recomputes():
    rng = np.random.default_rng(1)
    banks, items = _banks(rng), _items(rng)
    copied = [NewItem(i.image_id, i.path, i.vector, i.captions, i.caption_vectors, offset=0.25,
                      caption_offsets=np.full(len(i.captions), -0.5, np.float32) if i.captions else None)
              for i in items]
    store = FaissStore.in_memory("c", MODEL, DIM)
    target = Collection(store, banks)
    target.add_embedded(copied, keep_offsets=True)
    rows = store.catalog.rows()
    assert np.all(rows.image_offsets == np.float32(0.25)) and np.all(rows.caption_offsets == np.float32(-0.5))
    vecs = _unit(rng, 2)
    target.replace_captions("i1.jpg", ["new one", "new two"], vecs)
    assert store.get("i1.jpg").captions == ("new one", "new two")
    rows = store.catalog.rows()
    mine = [j for j, t in enumerate(rows.caption_texts) if t.startswith("new")]
    np.testing.assert_allclose(rows.caption_offsets[mine], banks.caption_offsets(vecs), atol=1e-6)


def test_a_served_collection_takes_only_the_corrections_it_was_built_with():
    rng = np.random.default_rng(2)
    banks = _banks(rng)
    store = FaissStore.in_memory("c", MODEL, DIM)
    store.add(_items(rng))
    assert Collection.served(store, banks).banks == Banks()  # built without one: new rows get none
    rows, vecs = store.catalog.caption_vectors()
    store.catalog.set_caption_offsets(rows, banks.caption_offsets(vecs), banks.captions.info)
    store.add([])  # re-read the records
    served = Collection.served(store, banks)
    assert served.banks.captions is banks.captions and served.banks.images is None
