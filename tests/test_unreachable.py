"""Rows an HNSW graph cannot reach are found (clipsearch/unreachable.py) and searched exactly beside it,
by `VectorIndex.search` and by a FaissStore's HNSW + delta kernel, before and after a save and load.

A node is cut off here by rewriting every edge that points at it to point elsewhere in the same list,
the state HNSW's neighbour pruning can leave a node in (the crash test's near-identical fake vectors
did, once in ~12 runs: a stored upload that no search returned).
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from clipsearch.index import IndexParams, VectorIndex
from clipsearch.store import FaissStore, NewItem
from clipsearch.store.kernels import hnsw_and_delta
from clipsearch.unreachable import unreachable_rows

DIM = 16
MODEL = {"model": "fake-unreachable", "pretrained": None, "checkpoint_sha256": None, "embed_dim": DIM}


def _unit(rng: np.random.Generator, n: int, d: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _edges(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    hnsw = faiss.downcast_index(index).hnsw
    return faiss.vector_to_array(hnsw.neighbors), faiss.vector_to_array(hnsw.offsets).astype(np.int64)


def _python_bfs(index: faiss.Index) -> set[int]:
    """Reachable nodes, walked one by one (the reference for the vectorised walk)."""
    neighbors, offsets = _edges(index)
    entry = faiss.downcast_index(index).hnsw.entry_point
    seen, stack = {entry}, [entry]
    while stack:
        u = stack.pop()
        for v in neighbors[offsets[u]:offsets[u + 1]]:
            if v >= 0 and int(v) not in seen:
                seen.add(int(v))
                stack.append(int(v))
    return seen


def _cut_off(index: faiss.Index, node: int) -> None:
    """Point every edge into `node` at another member of the same list (or the list's owner)."""
    hnsw = faiss.downcast_index(index).hnsw
    assert node != hnsw.entry_point
    neighbors, offsets = _edges(index)
    for u in range(index.ntotal):
        seg = neighbors[offsets[u]:offsets[u + 1]]
        others = [int(v) for v in seg if v >= 0 and v != node]
        seg[seg == node] = others[0] if others else u
    view = faiss.rev_swig_ptr(hnsw.neighbors.data(), hnsw.neighbors.size())
    view[:] = neighbors


def _fresh(index: VectorIndex) -> VectorIndex:
    """The same graph wrapped again without a recorded list: the list is found from the graph."""
    manifest = {k: v for k, v in index.manifest.items() if k != "unreachable"}
    return VectorIndex(index.index, index.params, manifest)


def test_walk_matches_a_plain_breadth_first_search():
    rng = np.random.default_rng(0)
    x = _unit(rng, 600)
    built = VectorIndex.build(x, IndexParams(m=4, ef_construction=40))  # a sparse graph, several levels
    assert faiss.downcast_index(built.index).hnsw.max_level >= 1
    _cut_off(built.index, 17)
    _cut_off(built.index, 333)
    expected = sorted(set(range(600)) - _python_bfs(built.index))
    assert 17 in expected and 333 in expected
    assert unreachable_rows(built.index).tolist() == expected


def test_flat_and_empty_indexes_have_none():
    assert unreachable_rows(faiss.IndexFlatIP(4)).size == 0
    assert unreachable_rows(faiss.IndexHNSWFlat(4, 8, faiss.METRIC_INNER_PRODUCT)).size == 0
    rng = np.random.default_rng(1)
    assert VectorIndex.build(_unit(rng, 50), IndexParams(kind="flat")).unreachable.size == 0


def test_a_cut_off_row_is_still_found_and_the_list_survives_save_and_load(tmp_path):
    rng = np.random.default_rng(2)
    x = _unit(rng, 300)
    built = VectorIndex.build(x, IndexParams(ef_search=400))
    node = next(i for i in (123, 124, 125) if i != faiss.downcast_index(built.index).hnsw.entry_point)
    _cut_off(built.index, node)
    # the defect itself: the graph alone never returns the row, not even for its own vector, at any efSearch
    _, raw = built.index.search(x[node:node + 1], 5, params=faiss.SearchParametersHNSW(efSearch=1000))
    assert node not in raw[0]

    index = _fresh(built)
    assert index.unreachable.tolist() == [node] and index.manifest["unreachable"] == [node]
    scores, ids = index.search(x[[node, 0]], 3)
    assert ids[0, 0] == node and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert ids[1, 0] == 0
    # the ranking is the exact one (the cut-off row merged in at its true rank)
    truth = np.argsort(-(x[node] @ x.T))[:3]
    assert ids[0].tolist() == truth.tolist()

    loaded = VectorIndex.load(index.save(tmp_path, "a.hnsw"))
    assert loaded.manifest["unreachable"] == [node] and loaded.unreachable.tolist() == [node]
    assert loaded.search(x[node:node + 1], 1)[1][0, 0] == node


def test_every_row_comes_once_and_offsets_count():
    rng = np.random.default_rng(3)
    x = _unit(rng, 40)
    offsets = np.zeros(40, np.float32)
    offsets[[5, 6]] = 2.0  # lifted above every other row (cosines are at most 1)
    built = VectorIndex.build(x, IndexParams(ef_search=64), offsets=offsets)
    node = 5 if faiss.downcast_index(built.index).hnsw.entry_point != 5 else 6
    _cut_off(built.index, node)
    index = _fresh(built)
    assert index.unreachable.tolist() == [node]
    q = x[0:1]
    scores, ids = index.search(q, 40)
    assert sorted(ids[0].tolist()) == list(range(40))  # every row, the cut-off one included, once
    np.testing.assert_allclose(scores[0], np.sort(q[0] @ x.T + offsets)[::-1], rtol=1e-5, atol=1e-5)
    assert set(ids[0, :2].tolist()) == {5, 6}


def _store_with_graph(rng: np.random.Generator, n: int = 60) -> tuple[FaissStore, np.ndarray]:
    store = FaissStore.in_memory("t", MODEL, DIM, exact_max=4)
    x = _unit(rng, n)
    store.add([NewItem(f"img{i}", f"/x/{i}.jpg", x[i], metadata={"even": i % 2 == 0}) for i in range(n)])
    store.compact(save=False)
    return store, x


def _cut_off_in_store(store: FaissStore, node: int) -> None:
    index = store._current().targets["images"].index
    assert index is not None
    _cut_off(index.index, node)
    index.unreachable = unreachable_rows(index.index)
    assert index.unreachable.tolist() == [node]


def test_store_search_finds_a_cut_off_row_and_respects_tombstones_and_filters():
    rng = np.random.default_rng(4)
    store, x = _store_with_graph(rng)
    live = store._current()
    node = next(p for p in (21, 23, 25) if p != faiss.downcast_index(live.targets["images"].index.index).hnsw.entry_point)
    image_id = live.image_ids[node]
    _cut_off_in_store(store, node)
    q = x[int(image_id[3:])]

    assert store.search(q, 1)[0].image_id == image_id
    assert [h.image_id for h in store.search(q, 5)] == [f"img{i}" for i in np.argsort(-(x @ q))[:5]]
    # a filter (answered exactly while it leaves at most EXACT_FILTERED_MAX rows): as for any row
    odd = int(image_id[3:]) % 2 == 1
    hits = store.search(q, 1, filter={"even": odd})  # its own flag is `not odd`
    assert hits and hits[0].image_id != image_id
    hits = store.search(q, 1, filter={"even": not odd})
    assert hits[0].image_id == image_id
    # rows added after the graph (the delta) still rank beside it
    store.add([NewItem("twin", "/x/twin.jpg", q)])
    assert {h.image_id for h in store.search(q, 2)} == {image_id, "twin"}
    # tombstones (the graph searched with an ID selector): another's leaves it found, its own hides it
    other = next(i for i in live.image_ids if i != image_id)
    store.delete([other])
    assert store.search(q, 1)[0].image_id in (image_id, "twin")
    assert {h.image_id for h in store.search(q, 2)} == {image_id, "twin"}
    store.delete([image_id])
    assert image_id not in [h.image_id for h in store.search(q, 5)]


def test_kernel_merges_the_cut_off_rows_with_the_delta():
    rng = np.random.default_rng(5)
    store, x = _store_with_graph(rng, 40)
    live = store._current()
    node = 7 if faiss.downcast_index(live.targets["images"].index.index).hnsw.entry_point != 7 else 8
    _cut_off_in_store(store, node)
    view = live.view("images", None)
    rows, scores = hnsw_and_delta(view, x[int(live.image_ids[node][3:])].reshape(1, -1), 40)
    assert sorted(rows.tolist()) == list(range(40)) and np.all(np.diff(scores) <= 1e-6)
