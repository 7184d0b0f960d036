"""FaissStore's hubness offsets where its search structures change: an HNSW graph (over [v, offset]
once offsets exist) with live adds in the delta beside it, tombstones, a compaction, the snapshot it
saves with the changes after it replayed at start-up, and the full rebuild `set_image_offsets` asks
for. A tiny `exact_max` makes the graph; every answer is checked against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from clipsearch.artifacts import ArtifactLayout
from clipsearch.store import Catalog, FaissStore, NewItem
from tests.store.conftest import DIM, unit

MODEL = {"model": "fake-offsets", "embed_dim": DIM}
EXACT_MAX = 4  # above this many rows a target gets an HNSW graph


class Truth:
    """The live items' vectors and offsets, and the ranking they must give."""

    def __init__(self) -> None:
        self.vectors: dict[str, np.ndarray] = {}
        self.offsets: dict[str, float] = {}
        self.captions: dict[str, tuple[np.ndarray, float]] = {}

    def add(self, store: FaissStore, rng: np.random.Generator, prefix: str, n: int, with_offsets: bool) -> None:
        vecs, caps = unit(rng, n), unit(rng, n)
        offs = rng.normal(0, 0.3, n).astype(np.float32) if with_offsets else np.zeros(n, np.float32)
        cap_offs = rng.normal(0, 0.3, n).astype(np.float32) if with_offsets else np.zeros(n, np.float32)
        store.add([NewItem(f"{prefix}{i}", f"/x/{prefix}{i}.png", vecs[i], captions=(f"{prefix}{i} words",),
                           caption_vectors=caps[i:i + 1], offset=float(offs[i]), caption_offsets=cap_offs[i:i + 1])
                   for i in range(n)])
        for i in range(n):
            self.vectors[f"{prefix}{i}"] = vecs[i]
            self.offsets[f"{prefix}{i}"] = float(offs[i])
            self.captions[f"{prefix}{i}#0"] = (caps[i], float(cap_offs[i]))

    def delete(self, store: FaissStore, ids: list[str]) -> None:
        assert store.delete(ids) == len(ids)
        for i in ids:
            self.vectors.pop(i)
            self.offsets.pop(i)
            self.captions.pop(f"{i}#0")

    def check(self, store: FaissStore, queries: np.ndarray) -> None:
        assert store.count() == len(self.vectors)
        for q in queries:
            for hubness in (True, False):
                want = sorted(((float(v @ q) + (self.offsets[i] if hubness else 0.0), float(v @ q), i)
                               for i, v in self.vectors.items()), key=lambda r: -r[0])
                hits = store.search(q, len(want), hubness=hubness)
                assert [h.image_id for h in hits] == [w[2] for w in want]
                assert [h.score for h in hits] == pytest.approx([w[0] for w in want], abs=1e-5)
                assert [h.cosine for h in hits] == pytest.approx([w[1] for w in want], abs=1e-5)
                caps = sorted(((float(v @ q) + (o if hubness else 0.0), float(v @ q), c)
                               for c, (v, o) in self.captions.items()), key=lambda r: -r[0])
                hits = store.search(q, len(caps), target="captions", hubness=hubness)
                assert [h.caption_id for h in hits] == [c[2] for c in caps]
                assert [h.score for h in hits] == pytest.approx([c[0] for c in caps], abs=1e-5)
                assert [h.cosine for h in hits] == pytest.approx([c[1] for c in caps], abs=1e-5)


@pytest.fixture
def layout(tmp_path):
    coll = ArtifactLayout(tmp_path / "artifacts").collection("c")
    with Catalog(coll.catalog) as cat:
        cat.set_model(MODEL, DIM)
    return coll


def test_image_offsets_through_hnsw_delta_compaction_snapshot_and_replay(layout):
    rng = np.random.default_rng(0)
    queries = unit(rng, 4)
    truth = Truth()
    store = FaissStore.open(layout, readonly=False, exact_max=EXACT_MAX)
    truth.add(store, rng, "a", 12, with_offsets=False)  # a graph without an offset column ...
    truth.check(store, queries)
    assert store.describe()["index"]["images"] == "hnsw"
    truth.add(store, rng, "b", 3, with_offsets=True)  # ... and rows with offsets in the delta beside it
    truth.delete(store, ["a1", "a7"])  # tombstones in the graph
    assert store.stats()["images"]["delta"] == 3 and store.stats()["images"]["tombstones"] == 2
    truth.check(store, queries)

    assert store.compact()["compacted"]  # one graph over [v, offset] for the live rows, saved
    assert store._current().targets["images"].index.has_offsets  # noqa: SLF001 - the layout is the point
    assert store.stats()["images"]["delta"] == 0
    truth.check(store, queries)

    truth.add(store, rng, "c", 3, with_offsets=True)  # after the snapshot: replayed at the next start
    truth.delete(store, ["b0", "a2"])
    store.close()
    again = FaissStore.open(layout, readonly=True, exact_max=EXACT_MAX)
    try:
        assert again.stats()["replayed_at_start"] > 0 and again.stats()["full_rebuilds"] == 0
        truth.check(again, queries)
    finally:
        again.close()


def test_set_image_offsets_rebuilds_past_the_snapshot(layout):
    rng = np.random.default_rng(1)
    queries = unit(rng, 3)
    truth = Truth()
    writer = FaissStore.open(layout, readonly=False, exact_max=EXACT_MAX)
    truth.add(writer, rng, "a", 10, with_offsets=True)
    writer.compact()
    reader = FaissStore.open(layout, readonly=True, exact_max=EXACT_MAX)
    truth.check(reader, queries)
    rows, _ = writer.catalog.image_vectors()
    ids = writer.catalog.rows().image_ids
    new = rng.normal(0, 0.5, len(rows)).astype(np.float32)
    writer.catalog.set_image_offsets(rows, new, {"beta": 0.4, "k": 5})
    truth.offsets = {i: float(o) for i, o in zip(ids, new)}
    assert reader.refresh()  # rebuild_seq moved: the graph is rebuilt with the new offsets, not patched
    truth.check(reader, queries)
    assert reader.describe()["hubness_images"] == {"beta": 0.4, "k": 5}
    assert reader.stats()["full_rebuilds"] == 1
    writer.close()
    reader.close()
    # the snapshot saved before the new offsets is not used at the next start: it is older than them
    fresh = FaissStore.open(layout, readonly=True, exact_max=EXACT_MAX)
    try:
        truth.check(fresh, queries)
        assert fresh.stats()["replayed_at_start"] == 0
    finally:
        fresh.close()
