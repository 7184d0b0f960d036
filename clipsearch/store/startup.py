"""A FaissStore's start-up when its HNSW snapshots are exactly current: the state without the catalog's vectors.

After a compaction or an ingest the snapshot of each large target reflects the catalog's last commit
and lists the catalog's rows in row order. Then the graph's own storage (an `IndexFlat` inside the
HNSW index) already holds every vector of that target, so start-up need not read the vectors out of
SQLite as BLOBs, join them and copy them twice (`Catalog.rows` + `placement`): the target's vector
array is a read-only view of the graph's storage, kept alive by the array itself, and only ids, paths,
metadata and caption texts come from the catalog, in one consistent read. The snapshot files are
memory-mapped (`VectorIndex.load(mmap=True)`): immutable, content-named files, so pages are read when
a search first touches them and are shared with the page cache.

Hubness offsets (a graph over `[v, offset]`) come from the catalog's offset columns; the vectors
are then a strided view without the offset column. Anything else (a change committed after the
snapshot, rows in another order, a large target without a snapshot) returns None and `FaissStore._build_full` lays the state out in general.
Both give the same state: tests/store/test_startup.py compares them field by field.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import faiss
import numpy as np
from numpy.typing import NDArray

from clipsearch.index import VectorIndex
from clipsearch.store.base import Item, value_key
from clipsearch.store.live import Live, Target

log = logging.getLogger(__name__)

__all__ = ["current_snapshot_state", "storage_vectors"]


class _Owner:
    """Exposes the graph's storage to numpy and keeps the FAISS index alive as long as any view of it."""

    def __init__(self, index: faiss.Index, view: NDArray[np.float32]):
        self.index = index
        self.__array_interface__ = {"shape": view.shape, "typestr": "<f4", "data": (view.ctypes.data, True),
                                    "strides": view.strides, "version": 3}


def storage_vectors(index: VectorIndex) -> NDArray[np.float32] | None:
    """The vectors an HNSW-Flat index stores, as a read-only (ntotal, dim) array that shares its memory
    (without the offset column of an index that has one: a strided view); None for another index type."""
    if not isinstance(index.index, faiss.IndexHNSWFlat):
        return None
    storage = faiss.downcast_index(index.index.storage)
    if not isinstance(storage, faiss.IndexFlat) or storage.ntotal != index.ntotal:
        return None
    n, d = int(storage.ntotal), int(storage.d)
    if n == 0:
        return None
    view = faiss.rev_swig_ptr(storage.get_xb(), n * d).reshape(n, d)[:, : index.dim]
    arr = np.asarray(_Owner(index.index, view))
    arr.flags.writeable = False  # rows below a target's n are never rewritten (live.py); a bug would raise
    return arr


def current_snapshot_state(store: Any, tried: dict[str, Any] | None = None) -> Live | None:
    """The start-up state of `store` (a `FaissStore`; not imported, it imports this module) built
    from current snapshots, or None where they are not. `tried`
    receives what `_load_snapshot` gave for each target it tried and the catalog head it read
    (`"head"`: (seq, rebuild_seq)), so the general path need not load (nor report) them again."""
    tried = {} if tried is None else tried
    t0 = time.perf_counter()
    catalog = store.catalog
    with catalog._read() as conn:
        meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN "
                                 "('seq', 'uid', 'rebuild_seq', 'hubness', 'hubness_images')").fetchall())
        seq, uid, rebuild_seq = int(meta.get("seq") or 0), meta.get("uid"), int(meta.get("rebuild_seq") or 0)
        tried["head"] = (seq, rebuild_seq)
        n_img = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        n_cap = conn.execute("SELECT COUNT(*) FROM captions").fetchone()[0]
        has_offsets = conn.execute("SELECT EXISTS (SELECT 1 FROM captions WHERE offset != 0)").fetchone()[0] == 1
        img_offsets = _image_offsets(conn)  # per-image hubness offsets (catalogs that have items.offset)
        snaps: dict[str, tuple[VectorIndex, list[str], NDArray[np.float32]]] = {}
        for target, n in (("images", n_img), ("captions", n_cap)):
            if n <= store.exact_max:
                continue
            snap = store._load_snapshot(target, seq, rebuild_seq, has_offsets if target == "captions" else img_offsets)
            tried[target] = snap
            if snap is None or snap[1] != seq or snap[2] is None or len(snap[2]) != n:
                return None
            index, _, ids = snap
            vectors = storage_vectors(index)
            if vectors is None:
                vectors = _without_offsets(index)
            if vectors.shape[1] != store.dim:
                return None
            snaps[target] = (index, ids, vectors)
        with_img_vec = "images" not in snaps
        # (image_id, path, metadata, offset, [vector]); offset 0 where the catalog has no such column
        items = conn.execute(f"SELECT image_id, path, metadata, {'offset' if img_offsets else '0'}"
                             f"{', vector' if with_img_vec else ''} FROM items ORDER BY row").fetchall()
        caps = conn.execute(f"SELECT caption_id, image_id, caption, offset{', vector' if 'captions' not in snaps else ''}"
                            " FROM captions ORDER BY row").fetchall()
    image_ids = [r[0] for r in items]
    caption_ids = [r[0] for r in caps]
    if ("images" in snaps and snaps["images"][1] != image_ids) or \
            ("captions" in snaps and snaps["captions"][1] != caption_ids):
        return None  # the snapshot's positions are not the catalog's rows: placed in general
    dim = store.dim
    live = Live(dim, seq, uid, _json_meta(meta.get("hubness")))
    live.hubness_images = _json_meta(meta.get("hubness_images"))  # how the image offsets were made
    row_of = {image_id: pos for pos, image_id in enumerate(image_ids)}
    cap_image = [row_of[r[1]] for r in caps]
    offsets = np.array([r[3] for r in caps], np.float32) if has_offsets else None

    img_offs = np.array([r[3] for r in items], np.float32) if img_offsets else None
    img_vecs = snaps["images"][2] if "images" in snaps else _stack([r[4] for r in items], dim)
    cap_vecs = snaps["captions"][2] if "captions" in snaps else _stack([r[4] for r in caps], dim)
    if img_vecs.shape[1] != dim or cap_vecs.shape[1] != dim:
        return None  # vectors of another width: the general path serves them so the model check names it
    live.targets["images"] = _filled(dim, img_vecs, img_offs, np.arange(n_img, dtype=np.int64))
    live.targets["captions"] = _filled(dim, cap_vecs, offsets, np.array(cap_image, np.int64))
    for target, (index, _, _) in snaps.items():
        tgt = live.targets[target]
        # the catalog's own id strings (equal to the ids file's, checked above), not a second copy of them
        tgt.index, tgt.index_seq = index, seq
        tgt.index_ids = list(image_ids if target == "images" else caption_ids)

    texts_of: dict[int, list[str]] = {}
    captions_of: dict[int, list[int]] = {}
    texts = [r[2] for r in caps]
    for j, pos in enumerate(cap_image):
        if pos in captions_of:
            captions_of[pos].append(j)
            texts_of[pos].append(texts[j])
        else:
            captions_of[pos] = [j]
            texts_of[pos] = [texts[j]]
    # one decode of every record (the per-call overhead of json.loads is most of its cost here)
    all_metadata = json.loads("[" + ",".join([r[2] for r in items]) + "]") if items else []
    if len(all_metadata) != len(items) or not all(isinstance(m, dict) for m in all_metadata):
        return None  # a record that is not one JSON object: the general path reports it
    live.facets, live.originals = _facets(all_metadata)
    live_items = LazyItems(image_ids, [r[1] for r in items], all_metadata, texts_of)
    live.image_ids, live.items, live.row_of = image_ids, live_items, row_of  # type: ignore[assignment]
    live.caption_ids, live.caption_texts, live.captions_of = caption_ids, texts, captions_of
    log.debug("collection %s: %d images, %d captions loaded from current snapshots in %.2f s", store.name,
              n_img, n_cap, time.perf_counter() - t0)
    return live


class LazyItems:
    """`Live.items` for a fast start: each loaded item's `Item` made when it is asked for (a search's
    hits, a thumbnail), not a million of them at start-up; items added later are kept as given.
    Supports what `Live` and `placement` do with the list: index, assign, append, len, iterate."""

    def __init__(self, image_ids: list[str], paths: list[str], metadata: list[dict[str, Any]],
                 texts_of: dict[int, list[str]]):
        self._ids, self._paths, self._metadata, self._texts_of = image_ids, paths, metadata, texts_of
        self._n = len(image_ids)
        self._set: dict[int, Item | None] = {}  # loaded positions assigned since
        self._added: list[Item | None] = []

    def __len__(self) -> int:
        return self._n + len(self._added)

    def __getitem__(self, pos: int) -> Item | None:
        pos = self._position(pos)
        if pos >= self._n:
            return self._added[pos - self._n]
        if pos in self._set:
            return self._set[pos]
        return Item(self._ids[pos], self._paths[pos], tuple(self._texts_of.get(pos, ())), self._metadata[pos])

    def __setitem__(self, pos: int, item: Item | None) -> None:
        pos = self._position(pos)
        if pos >= self._n:
            self._added[pos - self._n] = item
        else:
            self._set[pos] = item

    def _position(self, pos: int) -> int:
        pos = int(pos) + (len(self) if pos < 0 else 0)
        if not 0 <= pos < len(self):
            raise IndexError(pos)
        return pos

    def append(self, item: Item | None) -> None:
        self._added.append(item)

    def __iter__(self) -> Iterator[Item | None]:
        return (self[pos] for pos in range(len(self)))


def _facets(metadata: list[dict[str, Any]]) -> tuple[dict[str, dict[tuple[str, Any], set[int]]],
                                                      dict[str, dict[tuple[str, Any], Any]]]:
    """`Live.facets` and `Live.originals` of these records at positions 0.., as `Live._index_metadata`
    builds them one item at a time: the positions are grouped by (field, type, value) first (one
    dict lookup a value), then each group is given its filter key."""
    groups: dict[tuple[str, type, Any], list[int]] = {}
    for pos, record in enumerate(metadata):
        for name, value in record.items():
            group = (name, type(value), value)
            try:
                groups[group].append(pos)
            except KeyError:
                groups[group] = [pos]
            except TypeError:  # a list or an object: no filter can name it (value_key is None)
                pass
    facets: dict[str, dict[tuple[str, Any], set[int]]] = {}
    originals: dict[str, dict[tuple[str, Any], Any]] = {}
    for (name, _, value), positions in groups.items():  # in order of first occurrence
        key = value_key(value)
        if key is None:
            continue
        by_value = facets.setdefault(name, {})
        if key in by_value:
            by_value[key].update(positions)
        else:
            by_value[key] = set(positions)
            originals.setdefault(name, {})[key] = value
    return facets, originals


def _json_meta(raw: str | None) -> Any:
    return None if raw in (None, "null") else json.loads(raw)


def _image_offsets(conn: Any) -> bool:
    """Whether any item has a non-zero image offset (False for a catalog without the column)."""
    try:
        return conn.execute("SELECT EXISTS (SELECT 1 FROM items WHERE offset != 0)").fetchone()[0] == 1
    except sqlite3.OperationalError:  # no items.offset: a catalog from before image offsets
        return False


def _filled(dim: int, vectors: NDArray[np.float32], offsets: NDArray[np.float32] | None,
            image_rows: NDArray[np.int64]) -> Target:
    """A target holding exactly these rows, all alive, with `vectors` itself as its array (no copy):
    the first append reallocates, as `Target._grow` does for any full target."""
    n = int(vectors.shape[0])
    tgt = Target(dim)
    if n == 0:
        return tgt
    tgt.vectors = vectors
    tgt.offsets = offsets if offsets is not None else np.zeros(n, np.float32)
    tgt.has_offsets = bool(offsets is not None and np.any(offsets))
    tgt.alive = np.ones(n, bool)
    tgt.image_rows = image_rows
    tgt.n = n
    return tgt


def _without_offsets(index: VectorIndex) -> NDArray[np.float32]:
    """The stored vectors less the offset column (a copy, in chunks as `VectorIndex.offsets` does)."""
    n, d = index.ntotal, index.dim
    out = np.empty((n, d), np.float32)
    for start in range(0, n, 65536):
        k = min(65536, n - start)
        out[start:start + k] = index.index.reconstruct_n(start, k)[:, :d]
    return out


def _stack(blobs: list[bytes], dim: int) -> NDArray[np.float32]:
    if not blobs:
        return np.zeros((0, dim), np.float32)
    return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), -1).copy()
