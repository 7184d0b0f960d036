"""The embedded `VectorStore`: a SQLite catalog (the source of truth) and FAISS indexes derived from it.

Search is exact (one matrix product) while a target holds at most `exact_max` vectors, where it is
as fast as HNSW here (benchmarks/bench_store.py), and HNSW above. A filter that leaves few rows is
answered exactly over those rows, so filtered results are the true top k; a broad filter runs HNSW
with a FAISS ID selector. Writes go to the catalog first; the in-memory index is rebuilt from it on
the next read, so every read after a write sees it.

The HNSW graph of a large collection is saved beside the catalog (`index/`) with the catalog's
sequence number, so start-up loads it instead of rebuilding; a snapshot older than the catalog is
ignored and the index rebuilt in memory.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import faiss
import numpy as np
from numpy.typing import NDArray

from clipsearch.artifacts import CollectionLayout
from clipsearch.index import IndexParams, VectorIndex
from clipsearch.manifest import ArtifactError, read_json, sha256_json
from clipsearch.store.base import Filter, Hit, Item, StoreError, Target, filter_keys, value_key
from clipsearch.store.catalog import Catalog, CatalogRows, NewItem

log = logging.getLogger(__name__)

# Below this many vectors an exact search is as fast as HNSW on one core (and exact); see
# benchmarks/bench_store.py for the measured crossover.
EXACT_MAX = 20_000
# A filter that leaves at most this many rows is searched exactly over those rows.
EXACT_FILTERED_MAX = 50_000
# Metadata fields with at most this many distinct values are offered as filter choices.
FACET_MAX_VALUES = 50
SNAPSHOT_NAMES = {"images": "images.hnsw", "captions": "captions.hnsw"}


@dataclass(frozen=True)
class _Target:
    vectors: NDArray[np.float32]  # (n, dim), L2-normalised
    offsets: NDArray[np.float32] | None  # per-row score offset (captions' hubness), or None
    index: VectorIndex | None  # None: exact search over `vectors`
    image_rows: NDArray[np.int64]  # each row's image row (identity for images)


@dataclass(frozen=True)
class _State:
    seq: int
    image_ids: tuple[str, ...]
    row_of: Mapping[str, int]
    items: tuple[Item, ...]
    caption_ids: tuple[str, ...]
    caption_texts: tuple[str, ...]
    targets: Mapping[str, _Target]
    facets: Mapping[str, Mapping[tuple[str, Any], NDArray[np.int64]]]  # field -> value -> image rows
    facet_values: Mapping[str, list[Any]]
    hubness: Mapping[str, Any] | None  # the correction the caption offsets were made with


class FaissStore:
    """One collection; `open` one on disk or `in_memory` one (tests, fakes)."""

    def __init__(self, name: str, catalog: Catalog, layout: CollectionLayout | None = None,
                 params: IndexParams | None = None, exact_max: int = EXACT_MAX, verify: bool = True):
        self.name = name
        self.catalog = catalog
        self.layout = layout
        self.params = params or IndexParams()
        self.exact_max = exact_max
        self.verify = verify
        self._lock = threading.RLock()
        self._state: _State | None = None
        model = catalog.model()
        if model is None or catalog.dim is None:
            raise ArtifactError(f"collection {name!r} names no model; re-ingest it")
        self._model = model
        self._dim = int(catalog.dim)
        self._uid = catalog.get_meta("uid")

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

    # -- contract ---------------------------------------------------------------------------
    @property
    def model(self) -> Mapping[str, Any]:
        return self._model

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def version(self) -> str:
        state = self._current()
        return sha256_json([self.name, self._uid, state.seq, self._model])[:16]

    def count(self, target: Target = "images") -> int:
        return int(self._current().targets[target].vectors.shape[0])

    def ids(self) -> list[str]:
        return list(self._current().image_ids)

    def get(self, image_id: str) -> Item | None:
        state = self._current()
        row = state.row_of.get(image_id)
        return None if row is None else state.items[row]

    def vector(self, image_id: str) -> NDArray[np.float32] | None:
        state = self._current()
        row = state.row_of.get(image_id)
        return None if row is None else state.targets["images"].vectors[row].copy()

    def add(self, items: Sequence[NewItem]) -> None:
        self.catalog.put(items)
        self._invalidate()

    def delete(self, image_ids: Sequence[str]) -> int:
        n = self.catalog.delete(image_ids)
        self._invalidate()
        return n

    def replace_captions(self, image_id: str, captions: Sequence[str],
                         vectors: NDArray[np.float32]) -> None:
        item = self.get(image_id)
        if item is None:
            raise StoreError(f"no item {image_id!r} in collection {self.name!r}")
        vecs = np.asarray(vectors, dtype=np.float32).reshape(len(captions), self._dim)
        self.catalog.replace_captions([NewItem(image_id=image_id, path=item.path,
                                               vector=np.zeros(self._dim, np.float32),
                                               captions=tuple(captions), caption_vectors=vecs)])
        self._invalidate()

    def refresh(self) -> bool:
        state = self._state
        if state is None or self.catalog.seq == state.seq:
            return False
        self._invalidate()
        return True

    def describe(self) -> dict[str, Any]:
        state = self._current()
        return {
            "name": self.name,
            "images": len(state.image_ids),
            "captions": len(state.caption_ids),
            "model": dict(self._model),
            "index": {t: ("hnsw" if state.targets[t].index is not None else "exact") for t in state.targets},
            "version": self.version,
            "hubness": state.hubness,
            "metadata_fields": {k: list(v) for k, v in state.facet_values.items()},
        }

    def search(self, query: NDArray[np.float32], k: int, *, target: Target = "images",
               filter: Filter | None = None, offset: int = 0, min_score: float | None = None,
               exclude: Sequence[str] = ()) -> list[Hit]:
        state = self._current()
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        if q.shape[1] != self._dim:
            raise StoreError(f"query vector has dimension {q.shape[1]}, collection {self.name!r} holds "
                             f"{self._dim}")
        tgt = state.targets[target]
        n = tgt.vectors.shape[0]
        need = max(0, int(offset)) + max(1, int(k))
        allowed = self._allowed(state, tgt, filter, exclude)
        if n == 0 or need == 0 or (allowed is not None and not allowed.any()):
            return []
        if tgt.index is None or (allowed is not None and int(allowed.sum()) <= EXACT_FILTERED_MAX):
            rows, scores = _exact(tgt, q[0], need, allowed)
        else:
            rows, scores = _hnsw(tgt, q, need, allowed)
        hits = []
        for row, score in zip(rows[offset:offset + k], scores[offset:offset + k]):
            if min_score is not None and score < min_score:
                break  # ranked by score: the rest are lower still
            off = float(tgt.offsets[row]) if tgt.offsets is not None else 0.0
            image_id = state.image_ids[int(tgt.image_rows[row])]
            if target == "images":
                hits.append(Hit(image_id, float(score), float(score) - off))
            else:
                hits.append(Hit(image_id, float(score), float(score) - off, state.caption_ids[row],
                                state.caption_texts[row]))
        return hits

    # -- snapshots ----------------------------------------------------------------------------
    def save_snapshot(self) -> dict[str, str]:
        """Save the HNSW graphs (not needed for exact targets) tagged with the catalog's sequence."""
        if self.layout is None:
            raise ArtifactError("an in-memory store has nowhere to save a snapshot")
        state = self._current()
        saved = {}
        for target, name in SNAPSHOT_NAMES.items():
            tgt = state.targets[target]
            path = self.layout.index_dir / f"{name}.json"
            if tgt.index is None:
                path.unlink(missing_ok=True)
                continue
            tgt.index.manifest.update(self._snapshot_tag(state))
            tgt.index.save(self.layout.index_dir, name)
            saved[target] = str(path)
        return saved

    def _snapshot_tag(self, state: _State) -> dict[str, Any]:
        return {"collection": self.name, "catalog_seq": state.seq, "model": dict(self._model)}

    def _load_snapshot(self, target: str, rows_count: int, seq: int, with_offsets: bool) -> VectorIndex | None:
        if self.layout is None:
            return None
        path = self.layout.index_dir / f"{SNAPSHOT_NAMES[target]}.json"
        if not path.is_file():
            return None
        try:
            m = read_json(path)
            if (m.get("catalog_seq") != seq or m.get("count") != rows_count or m.get("model") != dict(self._model)
                    or bool(m.get("row_offsets")) != with_offsets or m.get("params") != asdict(_hnsw_params(self.params))):
                log.info("collection %s: %s snapshot is older than the catalog; rebuilding it", self.name, target)
                return None
            return VectorIndex.load(path, verify=self.verify)
        except ArtifactError as exc:
            log.warning("collection %s: %s snapshot unusable (%s); rebuilding it", self.name, target, exc)
            return None

    # -- internals ----------------------------------------------------------------------------
    def _invalidate(self) -> None:
        with self._lock:
            self._state = None

    def _current(self) -> _State:
        state = self._state
        if state is not None:
            return state
        with self._lock:
            if self._state is None:
                self._state = self._build(self.catalog.rows())
            return self._state

    def _build(self, rows: CatalogRows) -> _State:
        t0 = time.perf_counter()
        caps_by_row: list[list[str]] = [[] for _ in rows.image_ids]
        for img_row, text in zip(rows.caption_image_rows, rows.caption_texts):
            caps_by_row[int(img_row)].append(text)
        items = tuple(Item(i, p, tuple(c), m) for i, p, c, m in
                      zip(rows.image_ids, rows.paths, caps_by_row, rows.metadata))
        offsets = rows.caption_offsets if rows.caption_offsets.size and np.any(rows.caption_offsets) else None
        targets = {
            "images": self._target("images", rows.vectors, None, np.arange(len(rows.image_ids)), rows.seq),
            "captions": self._target("captions", rows.caption_vectors, offsets, rows.caption_image_rows, rows.seq),
        }
        facets, values = _facets(rows.metadata)
        state = _State(rows.seq, tuple(rows.image_ids), {i: r for r, i in enumerate(rows.image_ids)}, items,
                       tuple(rows.caption_ids), tuple(rows.caption_texts), targets, facets, values,
                       self.catalog.hubness())
        log.debug("collection %s: %d images, %d captions loaded in %.2f s", self.name, len(items),
                  len(rows.caption_ids), time.perf_counter() - t0)
        return state

    def _target(self, target: str, vectors: NDArray[np.float32], offsets: NDArray[np.float32] | None,
                image_rows: NDArray[np.int64], seq: int) -> _Target:
        n = vectors.shape[0]
        index = None
        if n > self.exact_max:
            index = self._load_snapshot(target, n, seq, offsets is not None)
            if index is None:
                index = VectorIndex.build(vectors, _hnsw_params(self.params), offsets=offsets,
                                          collection=self.name, catalog_seq=seq, model=dict(self._model))
        return _Target(vectors, offsets, index, np.asarray(image_rows, dtype=np.int64))

    def _allowed(self, state: _State, tgt: _Target, flt: Filter | None,
                 exclude: Sequence[str]) -> NDArray[np.bool_] | None:
        """Which rows of the target may be returned (None: all)."""
        if not flt and not exclude:
            return None
        image_ok = np.ones(len(state.image_ids), dtype=bool)
        if flt:
            try:
                keys = filter_keys(flt)
            except ValueError as exc:
                raise StoreError(str(exc)) from None
            for name, accepted in keys.items():
                by_value = state.facets.get(name, {})
                field_ok = np.zeros(len(state.image_ids), dtype=bool)
                for key in accepted:
                    rows = by_value.get(key)
                    if rows is not None:
                        field_ok[rows] = True
                image_ok &= field_ok
        for image_id in exclude:
            row = state.row_of.get(image_id)
            if row is not None:
                image_ok[row] = False
        return image_ok[tgt.image_rows]


def _hnsw_params(params: IndexParams) -> IndexParams:
    return IndexParams("hnsw", params.m, params.ef_construction, params.ef_search)


def _exact(tgt: _Target, q: NDArray[np.float32], need: int, allowed: NDArray[np.bool_] | None
           ) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    if allowed is not None:
        rows = np.flatnonzero(allowed)
        scores = tgt.vectors[rows] @ q
        if tgt.offsets is not None:
            scores += tgt.offsets[rows]
    else:
        rows = np.arange(tgt.vectors.shape[0])
        scores = tgt.vectors @ q
        if tgt.offsets is not None:
            scores = scores + tgt.offsets
    need = min(need, scores.shape[0])
    top = np.argpartition(-scores, need - 1)[:need] if need < scores.shape[0] else np.arange(scores.shape[0])
    # ties broken by row, so equal scores always come back in the same order
    order = top[np.lexsort((rows[top], -scores[top]))]
    return rows[order], scores[order]


def _hnsw(tgt: _Target, q: NDArray[np.float32], need: int, allowed: NDArray[np.bool_] | None
          ) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    index = tgt.index
    assert index is not None
    k = min(need, index.ntotal)
    query = np.hstack([q, np.ones((1, 1), np.float32)]) if index.has_offsets else q
    sel = None
    if allowed is not None:
        banned = np.flatnonzero(~allowed).astype(np.int64)
        sel = (faiss.IDSelectorNot(faiss.IDSelectorBatch(banned)) if banned.size < allowed.size // 2
               else faiss.IDSelectorBatch(np.flatnonzero(allowed).astype(np.int64)))
    sp = faiss.SearchParametersHNSW(efSearch=max(index.params.ef_search, k), sel=sel)
    scores, ids = index.index.search(query, k, params=sp)
    keep = ids[0] >= 0
    return ids[0][keep].astype(np.int64), scores[0][keep]


def _facets(metadata: list[dict[str, Any]]) -> tuple[dict[str, dict[tuple[str, Any], NDArray[np.int64]]],
                                                       dict[str, list[Any]]]:
    """field -> value -> rows, for every scalar metadata value; and the fields with few values."""
    rows: dict[str, dict[tuple[str, Any], list[int]]] = {}
    originals: dict[str, dict[tuple[str, Any], Any]] = {}
    for row, meta in enumerate(metadata):
        for name, value in meta.items():
            key = value_key(value)
            if key is None:
                continue
            rows.setdefault(name, {}).setdefault(key, []).append(row)
            originals.setdefault(name, {}).setdefault(key, value)
    facets = {name: {key: np.asarray(r, dtype=np.int64) for key, r in by.items()} for name, by in rows.items()}
    values = {name: sorted(originals[name].values(), key=lambda v: (str(type(v)), v))
              for name in sorted(rows) if len(rows[name]) <= FACET_MAX_VALUES}
    return facets, values
