"""The embedded `VectorStore`: a SQLite catalog (the source of truth) and FAISS indexes derived from it.

Search is exact (one matrix product) while a target holds at most `exact_max` vectors, where it is
as fast as HNSW here (benchmarks/bench_store.py), and HNSW above. A filter that leaves few rows is
answered exactly over those rows, so filtered results are the true top k; a broad filter runs HNSW
with a FAISS ID selector.

Writes commit to the catalog first (acknowledged = committed), then the in-memory state
(`clipsearch.store.live`) catches up with what committed since its sequence number: new rows are
appended (to the exact arrays, or to the delta searched beside the HNSW graph), deletions become
tombstones filtered at search. The same catch-up picks up other processes' commits (`refresh`).
`compact()` rebuilds the graph over the live rows off the lock, swaps it in, and saves it as a
snapshot in `index/` tagged with the catalog seq it reflects and the id at each position; start-up
loads the snapshot and replays the changes committed after it (rows with a larger seq, tombstones),
so a large collection never has to rebuild its graph at start-up.

Every image and caption row carries its hubness offset (the catalog's `offset` columns): a target
with any non-zero offset is searched by `cosine + offset` (its graph built over `[v, offset]`), or
by the plain cosine when a search asks `hubness=False`. Offsets set for the whole collection
(`Catalog.set_image_offsets` / `set_caption_offsets`) move `rebuild_seq`, so readers rebuild.

How rows are placed in the live state is `clipsearch.store.placement`; the exact and HNSW + delta
searches are `clipsearch.store.kernels`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
from numpy.typing import NDArray

from clipsearch.artifacts import CollectionLayout
from clipsearch.index import IndexParams, VectorIndex
from clipsearch.manifest import ArtifactError, atomic_write_text, read_json, sha256_json
from clipsearch.store.base import Filter, Hit, Item, StoreError, Target, VectorStore, filter_keys
from clipsearch.store.catalog import Catalog, NewItem
from clipsearch.store.kernels import exact_top, hnsw_and_delta
from clipsearch.store.live import FACET_MAX_VALUES, Live
from clipsearch.store.placement import apply_rows, place_captions, place_images, relayout
from clipsearch.store.startup import current_snapshot_state

log = logging.getLogger(__name__)

# Below this many vectors an exact search is as fast as HNSW on one core (and exact); see
# benchmarks/bench_store.py for the measured crossover.
EXACT_MAX = 20_000
# A filter that leaves at most this many rows is searched exactly over those rows.
EXACT_FILTERED_MAX = 50_000
SNAPSHOT_NAMES = {"images": "images.hnsw", "captions": "captions.hnsw"}
__all__ = ["EXACT_MAX", "EXACT_FILTERED_MAX", "FACET_MAX_VALUES", "FaissStore", "SNAPSHOT_NAMES"]


class FaissStore(VectorStore):
    """One collection; `open` one on disk or `in_memory` one (tests, fakes)."""

    compacts = True

    def __init__(self, name: str, catalog: Catalog, layout: CollectionLayout | None = None,
                 params: IndexParams | None = None, exact_max: int = EXACT_MAX, verify: bool = True):
        self.name = name
        self.catalog = catalog
        self.layout = layout
        self.params = params or IndexParams()
        self.exact_max = exact_max
        self.verify = verify
        self._lock = threading.RLock()  # writers, catch-up and the readers' view copies
        self._compact_lock = threading.Lock()  # one compaction at a time
        self._live: Live | None = None
        self._counters = {"replayed_at_start": 0, "compactions": 0, "compaction_seconds_total": 0.0,
                          "last_compaction_seconds": 0.0, "full_rebuilds": 0}
        model = catalog.model()
        if model is None or catalog.dim is None:
            raise ArtifactError(f"collection {name!r} names no model; re-ingest it")
        self._model = model
        self._dim = int(catalog.dim)
        self._inode = self._catalog_inode()

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def open(cls, layout: CollectionLayout, readonly: bool = True, params: IndexParams | None = None,
             exact_max: int = EXACT_MAX, verify: bool = True) -> "FaissStore":
        if not layout.catalog.is_file():
            raise ArtifactError(f"collection {layout.name!r} has no catalog ({layout.catalog.name}); "
                                f"ingest it with `python -m offline ingest SOURCE --collection {layout.name}`")
        return cls(layout.name, Catalog(layout.catalog, readonly=readonly), layout, params, exact_max, verify)

    @classmethod
    def in_memory(cls, name: str, model: Mapping[str, Any], dim: int, params: IndexParams | None = None,
                  exact_max: int = EXACT_MAX) -> "FaissStore":
        catalog = Catalog(":memory:")
        catalog.set_model(model, dim)
        return cls(name, catalog, None, params, exact_max)

    def close(self) -> None:
        self.catalog.close()

    @property
    def writable(self) -> bool:
        return not self.catalog.readonly

    # -- contract ---------------------------------------------------------------------------
    @property
    def model(self) -> Mapping[str, Any]:
        return self._model

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def version(self) -> str:
        live = self._current()
        return sha256_json([self.name, live.uid, live.seq, self._model])[:16]

    def count(self, target: Target = "images") -> int:
        return self._current().targets[target].live_count

    def ids(self) -> list[str]:
        live = self._current()
        with self._lock:
            return [live.image_ids[p] for p in live.live_positions("images")]

    def get(self, image_id: str) -> Item | None:
        live = self._current()
        pos = live.row_of.get(image_id)
        return None if pos is None else live.items[pos]

    def get_many(self, image_ids: Sequence[str]) -> list[Item | None]:
        live = self._current()  # one state for the whole page
        return [None if (pos := live.row_of.get(i)) is None else live.items[pos] for i in image_ids]

    def vector(self, image_id: str) -> NDArray[np.float32] | None:
        live = self._current()
        with self._lock:
            pos = live.row_of.get(image_id)
            return None if pos is None else live.targets["images"].vectors[pos].copy()

    def add(self, items: Sequence[NewItem]) -> None:
        self.catalog.put(items)
        self._catch_up()

    def delete(self, image_ids: Sequence[str]) -> int:
        n = self.catalog.delete(image_ids)
        self._catch_up()
        return n

    def replace_captions(self, image_id: str, captions: Sequence[str], vectors: NDArray[np.float32],
                         offsets: NDArray[np.float32] | None = None) -> None:
        item = self.get(image_id)
        if item is None:
            raise StoreError(f"no item {image_id!r} in collection {self.name!r}")
        vecs = np.asarray(vectors, dtype=np.float32).reshape(len(captions), self._dim)
        n = self.catalog.replace_captions([NewItem(image_id=image_id, path=item.path,
                                                   vector=np.zeros(self._dim, np.float32),
                                                   captions=tuple(captions), caption_vectors=vecs,
                                                   caption_offsets=offsets)])
        self._catch_up()
        if n == 0:
            raise StoreError(f"no item {image_id!r} in collection {self.name!r}")

    def refresh(self) -> bool:
        """Pick up what other processes committed: a cheap read of the catalog's head when nothing did."""
        if self._live is None:
            return False
        if self.layout is not None and self._catalog_inode() not in (None, self._inode):
            self._reopen()  # the catalog was made afresh (ingest --force): our connection reads the old file
            return True
        return self._catch_up()

    def describe(self) -> dict[str, Any]:
        live = self._current()
        with self._lock:
            values = live.facet_values()
            counts = {t: live.targets[t].live_count for t in live.targets}
            kinds = {t: ("hnsw" if live.targets[t].index is not None else "exact") for t in live.targets}
        return {
            "name": self.name,
            "images": counts["images"],
            "captions": counts["captions"],
            "model": dict(self._model),
            "index": kinds,
            "version": self.version,
            "hubness": live.hubness,
            "hubness_images": live.hubness_images,
            "metadata_fields": values,
        }

    @property
    def hubness(self) -> Mapping[str, Any] | None:
        """How the caption offsets were made (image → caption searches), or None (as QdrantStore)."""
        return self._current().hubness

    @property
    def hubness_images(self) -> Mapping[str, Any] | None:
        """How the image offsets were made (text → image searches), or None."""
        return self._current().hubness_images

    def stats(self) -> dict[str, Any]:
        """What a service exports as metrics (`VectorStore.stats`), and the compaction counters."""
        live = self._current()
        with self._lock:
            out: dict[str, Any] = {"seq": live.seq}
            for t, tgt in live.targets.items():
                out[t] = {"live": tgt.live_count, "tombstones": tgt.dead, "delta": tgt.delta,
                          "index": "hnsw" if tgt.index is not None else "exact"}
        out.update(self._counters)
        return out

    def search(self, query: NDArray[np.float32], k: int, *, target: Target = "images",
               filter: Filter | None = None, offset: int = 0, min_score: float | None = None,
               exclude: Sequence[str] = (), hubness: bool = True) -> list[Hit]:
        live = self._current()
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        if q.shape[1] != self._dim:
            raise StoreError(f"query vector has dimension {q.shape[1]}, collection {self.name!r} holds "
                             f"{self._dim}")
        try:
            keys = filter_keys(filter) if filter else None
        except ValueError as exc:
            raise StoreError(str(exc)) from None
        with self._lock:  # only the masks are built here; the search itself runs unlocked
            view = live.view(target, live.image_mask(keys, list(exclude)), hubness=hubness)
            image_ids, caption_ids, caption_texts = live.image_ids, live.caption_ids, live.caption_texts
        n = view.vectors.shape[0]
        need = max(0, int(offset)) + max(1, int(k))
        allowed_n = n if view.allowed is None else int(view.allowed.sum())
        if n == 0 or allowed_n == 0:
            return []
        if view.index is None or (view.filtered and allowed_n <= EXACT_FILTERED_MAX):
            rows, scores = exact_top(view.vectors, view.offsets, q[0], need, view.allowed)
        else:
            rows, scores = hnsw_and_delta(view, q, need)
        hits = []
        for row, score in zip(rows[offset:offset + k], scores[offset:offset + k]):
            if min_score is not None and score < min_score:
                break  # ranked by score: the rest are lower still
            off = float(view.offsets[row]) if view.offsets is not None else 0.0
            image_id = image_ids[int(view.image_rows[row])]
            if target == "images":
                hits.append(Hit(image_id, float(score), float(score) - off))
            else:
                hits.append(Hit(image_id, float(score), float(score) - off, caption_ids[row],
                                caption_texts[row]))
        return hits

    # -- compaction and snapshots -------------------------------------------------------------
    def compact(self, save: bool = True) -> dict[str, Any]:
        """Rebuild the search structures over the live rows (dropping tombstones, folding the delta
        into a new HNSW graph where a target is large) and swap them in atomically; then save the
        graphs as the snapshot. Searches and writes go on meanwhile: writes that land during the
        build are carried over into the new state before the swap."""
        with self._compact_lock:
            t0 = time.perf_counter()
            self._catch_up()
            live = self._current()
            with self._lock:
                captured = {t: live.live_positions(t) for t in live.targets}
                data = {t: (live.targets[t].vectors[captured[t]].copy(), live.targets[t].offsets[captured[t]].copy(),
                            live.targets[t].has_offsets) for t in live.targets}
                seq = live.seq
                ids = {"images": [live.image_ids[p] for p in captured["images"]],
                       "captions": [live.caption_ids[p] for p in captured["captions"]]}
            indexes = {t: self._build_index(vecs, offs if has else None, seq) for t, (vecs, offs, has) in data.items()}
            with self._lock:
                if self._live is not live:  # a full rebuild replaced the state meanwhile; it is current
                    return {"compacted": False, "reason": "the state was rebuilt meanwhile"}
                new = relayout(live, captured, indexes, seq, ids)
                self._live = new
            saved = self._save_indexes(new) if save and self.layout is not None and self.writable else {}
            took = time.perf_counter() - t0
            self._counters["compactions"] += 1
            self._counters["compaction_seconds_total"] += took
            self._counters["last_compaction_seconds"] = took
            log.info("collection %s: compacted to %d images / %d captions at seq %d in %.2f s", self.name,
                     len(captured["images"]), len(captured["captions"]), seq, took)
            return {"compacted": True, "seq": seq, "seconds": round(took, 4), "snapshot": saved,
                    "images": len(captured["images"]), "captions": len(captured["captions"])}

    def save_snapshot(self) -> dict[str, str]:
        """Save the HNSW graphs (not needed for exact targets) tagged with the catalog seq they reflect."""
        if self.layout is None:
            raise ArtifactError("an in-memory store has nowhere to save a snapshot")
        live = self._current()
        if any(t.delta or t.dead for t in live.targets.values() if t.index is not None):
            self.compact(save=False)  # the graph must cover every live row before it is worth saving
            live = self._current()
        return self._save_indexes(live)

    def _save_indexes(self, live: Live) -> dict[str, str]:
        assert self.layout is not None
        saved = {}
        for target, name in SNAPSHOT_NAMES.items():
            tgt = live.targets[target]
            path = self.layout.index_dir / f"{name}.json"
            if tgt.index is None:
                path.unlink(missing_ok=True)
                continue
            ids_text = json.dumps(tgt.index_ids)
            ids_sha = sha256_json(tgt.index_ids)
            ids_file = self.layout.index_dir / f"{name}.ids.{ids_sha[:12]}.json"
            atomic_write_text(ids_file, ids_text)  # before the manifest, whose rename commits the snapshot
            tgt.index.manifest.update({"collection": self.name, "catalog_seq": tgt.index_seq,
                                       "model": dict(self._model), "ids_file": ids_file.name,
                                       "ids_sha256": ids_sha})
            tgt.index.save(self.layout.index_dir, name)
            for old in self.layout.index_dir.glob(f"{name}.ids.*.json"):
                if old != ids_file:
                    old.unlink(missing_ok=True)
            saved[target] = str(path)
        return saved

    def _load_snapshot(self, target: str, seq: int, rebuild_seq: int, with_offsets: bool
                       ) -> tuple[VectorIndex, int, list[str] | None] | None:
        """(index, the seq it reflects, the id at each position; None: positions are catalog rows)."""
        if self.layout is None:
            return None
        path = self.layout.index_dir / f"{SNAPSHOT_NAMES[target]}.json"
        if not path.is_file():
            return None
        try:
            m = read_json(path)
            snap_seq = m.get("catalog_seq")
            if (not isinstance(snap_seq, int) or snap_seq > seq or snap_seq < rebuild_seq
                    or m.get("model") != dict(self._model) or m.get("params") != asdict(_hnsw_params(self.params))
                    or (not m.get("ids_file") and (snap_seq != seq or bool(m.get("row_offsets")) != with_offsets))):
                log.info("collection %s: %s snapshot is older than the catalog; rebuilding it", self.name, target)
                return None
            ids = None
            if m.get("ids_file"):
                ids_path = self.layout.index_dir / str(m["ids_file"])
                if not ids_path.is_file():
                    raise ArtifactError(f"missing file {ids_path.name}")
                ids = json.loads(ids_path.read_text(encoding="utf-8"))
                if sha256_json(ids) != m.get("ids_sha256") or len(ids) != m.get("count"):
                    raise ArtifactError(f"{ids_path.name} does not match its manifest")
            return VectorIndex.load(path, verify=self.verify, mmap=True), snap_seq, ids
        except (ArtifactError, ValueError) as exc:
            log.warning("collection %s: %s snapshot unusable (%s); rebuilding it", self.name, target, exc)
            return None

    # -- internals ----------------------------------------------------------------------------
    def _current(self) -> Live:
        live = self._live
        if live is not None:
            return live
        with self._lock:
            if self._live is None:
                self._live = self._build_full(start=True)
            return self._live

    def _catch_up(self) -> bool:
        """Apply what committed after the state's seq; True when the contents changed."""
        with self._lock:
            live = self._live
            if live is None:
                return True  # built on the next read, from the catalog as it is then
            seq, uid, rebuild_seq = self.catalog.head()
            if uid != live.uid or rebuild_seq > live.seq:
                self._live = self._build_full()
                return True
            if seq == live.seq:
                return False
            changes = self.catalog.changes_since(live.seq)
            if changes.uid != live.uid or changes.rebuild_seq > live.seq:
                self._live = self._build_full()
                return True
            for image_id in changes.deleted:
                live.remove(image_id)
            apply_rows(live, changes.rows, range(len(changes.rows.image_ids)))
            live.seq = changes.seq
            return True

    def _build_full(self, start: bool = False) -> Live:
        """The state from every catalog row: the snapshot's graph where one is usable, the changes
        committed after it replayed onto it."""
        t0 = time.perf_counter()
        tried: dict[str, Any] = {}  # the snapshots the fast start loaded (or found unusable), by target
        if start and (fast := current_snapshot_state(self, tried)) is not None:
            return fast  # every large target's snapshot is current: no vectors read from the catalog
        rows = self.catalog.rows()
        seq, uid, rebuild_seq = self.catalog.head()
        if tried.get("head") != (rows.seq, rebuild_seq):
            tried = {}
        if seq != rows.seq:  # a commit landed between the two reads: read again, in one piece
            return self._build_full(start)
        cap_offsets = _nonzero(rows.caption_offsets)
        img_offsets = _nonzero(rows.image_offsets)
        # (vectors wider or narrower than the catalog's dim: served as they are, so the service's model
        # check names the mismatch instead of this failing on a reshape)
        dim = rows.vectors.shape[1] if rows.vectors.shape[0] else self._dim
        live = Live(dim, rows.seq, uid, self.catalog.hubness(),
                    capacity=(len(rows.image_ids), len(rows.caption_ids)),
                    hubness_images=self.catalog.hubness_images())
        n_img, n_cap = len(rows.image_ids), len(rows.caption_ids)
        snaps = {}
        if n_img > self.exact_max:
            snaps["images"] = tried["images"] if "images" in tried else \
                self._load_snapshot("images", rows.seq, rebuild_seq, img_offsets is not None)
        if n_cap > self.exact_max:
            snaps["captions"] = tried["captions"] if "captions" in tried else \
                self._load_snapshot("captions", rows.seq, rebuild_seq, cap_offsets is not None)
        replayed = place_images(live, rows, snaps.get("images"), img_offsets)
        replayed += place_captions(live, rows, snaps.get("captions"), cap_offsets)
        for target, vecs, offs in (("images", rows.vectors, img_offsets),
                                   ("captions", rows.caption_vectors, cap_offsets)):
            tgt = live.targets[target]
            if tgt.index is None and vecs.shape[0] > self.exact_max:
                tgt.index = self._build_index(tgt.vectors[: tgt.n], tgt.offsets[: tgt.n] if offs is not None else None,
                                              rows.seq)
                tgt.index_seq = rows.seq
                tgt.index_ids = list(live.image_ids if target == "images" else live.caption_ids)
        if start:
            self._counters["replayed_at_start"] += replayed
        else:
            self._counters["full_rebuilds"] += 1
        if replayed:
            log.info("collection %s: snapshot loaded, %d changes after it replayed", self.name, replayed)
        log.debug("collection %s: %d images, %d captions loaded in %.2f s", self.name, n_img, n_cap,
                  time.perf_counter() - t0)
        return live

    def _build_index(self, vectors: NDArray[np.float32], offsets: NDArray[np.float32] | None,
                     seq: int) -> VectorIndex | None:
        if vectors.shape[0] <= self.exact_max or vectors.shape[0] == 0:
            return None
        return VectorIndex.build(vectors, _hnsw_params(self.params), offsets=offsets, collection=self.name,
                                 catalog_seq=seq, model=dict(self._model))

    def _catalog_inode(self) -> int | None:
        if self.layout is None:
            return None
        try:
            return os.stat(self.layout.catalog).st_ino
        except OSError:
            return None

    def _reopen(self) -> None:
        assert self.layout is not None
        with self._lock:
            old = self.catalog
            self.catalog = Catalog(self.layout.catalog, readonly=old.readonly)
            self._inode = self._catalog_inode()
            old.close()
            model = self.catalog.model()
            if model != self._model or self.catalog.dim != self._dim:
                log.warning("collection %s: the catalog now names another model; keep serving until a reload",
                            self.name)
            self._live = self._build_full()


def _nonzero(offsets: NDArray[np.float32]) -> NDArray[np.float32] | None:
    """The offsets where any is non-zero (None: the target ranks by the plain cosine alone)."""
    return offsets if offsets.size and np.any(offsets) else None


def _hnsw_params(params: IndexParams) -> IndexParams:
    return IndexParams("hnsw", params.m, params.ef_construction, params.ef_search)
