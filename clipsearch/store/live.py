"""The in-memory, searchable form of a collection: append-only rows, tombstones, an optional HNSW graph.

Every row (an image or a caption) gets a position when it is added and keeps it until the next
compaction: an upsert kills the old position and appends a new one, a delete kills it. Killing is a
flag in `alive`, so deletions cost nothing at write time and are filtered at search time (a mask for
exact search, a FAISS ID selector for HNSW). An HNSW graph, when the target has one, covers the
first `indexed` positions; rows appended after it (the delta) are searched exactly and merged. A
compaction (`FaissStore.compact`) builds a new graph over the live rows and swaps a fresh `Live` in.

Writers mutate a `Live` under the store's lock; readers take the lock only to copy the mask and the
array references they need (`Target.view`), never for the matrix product or the graph walk. Arrays
grow by reallocation (a reader keeps the old one), rows below a reader's `n` are never rewritten,
and lists only grow, so a reader's view stays consistent without copying vectors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from clipsearch.index import VectorIndex
from clipsearch.store.base import Item, value_key

# Metadata fields with at most this many distinct values are offered as filter choices.
FACET_MAX_VALUES = 50


class Target:
    """One searchable target (images or captions): vectors, hubness offsets (searches rank by
    cosine + offset unless told not to), liveness, owning image rows."""

    def __init__(self, dim: int, capacity: int = 0):
        capacity = max(16, capacity)
        self.dim = dim
        self.vectors = np.zeros((capacity, dim), np.float32)
        self.offsets = np.zeros(capacity, np.float32)
        self.alive = np.zeros(capacity, bool)
        self.image_rows = np.zeros(capacity, np.int64)  # each row's image position (identity for images)
        self.n = 0
        self.dead = 0
        self.has_offsets = False
        self.index: VectorIndex | None = None  # covers positions [0, index.ntotal)
        self.index_seq = 0  # the catalog seq of the rows the index was built from
        self.index_ids: list[str] = []  # the id at each indexed position when it was built

    def _grow(self, need: int) -> None:
        cap = self.vectors.shape[0]
        if need <= cap:
            return
        new = max(need, cap * 2)
        for name in ("vectors", "offsets", "alive", "image_rows"):
            old = getattr(self, name)
            arr = np.zeros((new, *old.shape[1:]), old.dtype)
            arr[: self.n] = old[: self.n]
            setattr(self, name, arr)  # a reader holding the old array keeps it

    def append(self, vectors: NDArray[np.float32], offsets: NDArray[np.float32] | None,
               image_rows: NDArray[np.int64], alive: NDArray[np.bool_] | None = None) -> int:
        """Append rows; returns the first new position."""
        k = int(vectors.shape[0])
        start = self.n
        self._grow(start + k)
        self.vectors[start:start + k] = vectors
        if offsets is not None:
            self.offsets[start:start + k] = offsets
            if np.any(offsets):
                self.has_offsets = True
        self.image_rows[start:start + k] = image_rows
        live = np.ones(k, bool) if alive is None else alive
        self.alive[start:start + k] = live
        self.dead += int(k - live.sum())
        self.n = start + k  # last: a reader that sees the new n sees the rows
        return start

    def kill(self, pos: int) -> None:
        if self.alive[pos]:
            self.alive[pos] = False
            self.dead += 1

    @property
    def live_count(self) -> int:
        return self.n - self.dead

    @property
    def delta(self) -> int:
        """Rows appended since the HNSW graph was built (0 without a graph)."""
        return self.n - self.index.ntotal if self.index is not None else 0


@dataclass
class View:
    """What one search reads, copied under the lock (the vectors themselves are not copied)."""

    vectors: NDArray[np.float32]
    offsets: NDArray[np.float32] | None
    allowed: NDArray[np.bool_] | None  # None: every row
    image_rows: NDArray[np.int64]
    index: VectorIndex | None
    filtered: bool  # a filter or an exclusion narrowed the rows (tombstones alone do not count)
    hubness: bool = True  # rank by cosine + offset (`offsets` is None when False or when all are 0)


class Live:
    """A collection's searchable state at catalog sequence number `seq`."""

    def __init__(self, dim: int, seq: int, uid: str | None, hubness: Mapping[str, Any] | None,
                 capacity: tuple[int, int] = (0, 0), hubness_images: Mapping[str, Any] | None = None):
        self.dim = dim
        self.seq = seq
        self.uid = uid
        self.hubness = hubness  # how the caption offsets were made
        self.hubness_images = hubness_images  # how the image offsets were made
        self.image_ids: list[str] = []
        self.items: list[Item | None] = []
        self.row_of: dict[str, int] = {}
        self.caption_ids: list[str] = []
        self.caption_texts: list[str] = []
        self.captions_of: dict[int, list[int]] = {}
        self.targets = {"images": Target(dim, capacity[0]), "captions": Target(dim, capacity[1])}
        self.facets: dict[str, dict[tuple[str, Any], set[int]]] = {}
        self.originals: dict[str, dict[tuple[str, Any], Any]] = {}

    # -- writes (under the store's lock) -------------------------------------------------------
    def put(self, item: Item, vector: NDArray[np.float32], caption_ids: list[str],
            caption_vectors: NDArray[np.float32], caption_offsets: NDArray[np.float32] | None,
            offset: float = 0.0) -> int:
        """Add or replace one item (`offset`: its image's hubness offset); returns its image position."""
        if item.image_id in self.row_of:
            self.remove(item.image_id)
        images = self.targets["images"]
        pos = images.n
        images.append(vector.reshape(1, -1), np.array([offset], np.float32) if offset else None,
                      np.array([pos], np.int64))
        self.image_ids.append(item.image_id)
        self.items.append(item)
        self.row_of[item.image_id] = pos
        self._index_metadata(pos, item.metadata)
        self.add_captions(pos, caption_ids, list(item.captions), caption_vectors, caption_offsets)
        return pos

    def add_captions(self, image_pos: int, caption_ids: list[str], texts: list[str],
                     vectors: NDArray[np.float32], offsets: NDArray[np.float32] | None) -> None:
        if not caption_ids:
            return
        caps = self.targets["captions"]
        start = caps.append(vectors.reshape(len(caption_ids), -1), offsets,
                            np.full(len(caption_ids), image_pos, np.int64))
        self.caption_ids.extend(caption_ids)
        self.caption_texts.extend(texts)
        self.captions_of.setdefault(image_pos, []).extend(range(start, start + len(caption_ids)))

    def remove_captions(self, image_pos: int) -> None:
        caps = self.targets["captions"]
        for cpos in self.captions_of.pop(image_pos, []):
            caps.kill(cpos)

    def remove(self, image_id: str) -> bool:
        pos = self.row_of.pop(image_id, None)
        if pos is None:
            return False
        self.targets["images"].kill(pos)
        self.remove_captions(pos)
        item = self.items[pos]
        if item is not None:
            for name, value in item.metadata.items():
                key = value_key(value)
                if key is not None:
                    self.facets.get(name, {}).get(key, set()).discard(pos)
        return True

    def _index_metadata(self, pos: int, metadata: Mapping[str, Any]) -> None:
        for name, value in metadata.items():
            key = value_key(value)
            if key is None:
                continue
            self.facets.setdefault(name, {}).setdefault(key, set()).add(pos)
            self.originals.setdefault(name, {}).setdefault(key, value)

    # -- reads (under the store's lock) ---------------------------------------------------------
    def view(self, target: str, image_ok: NDArray[np.bool_] | None, hubness: bool = True) -> View:
        """`hubness`: the rows' offsets count (False: rank by the plain cosine)."""
        tgt = self.targets[target]
        n = tgt.n
        rows = tgt.image_rows[:n]
        allowed = tgt.alive[:n].copy() if tgt.dead else None
        if image_ok is not None:
            ok = image_ok[rows]
            allowed = ok if allowed is None else allowed & ok
        return View(tgt.vectors[:n], tgt.offsets[:n] if tgt.has_offsets and hubness else None, allowed, rows,
                    tgt.index, image_ok is not None, hubness)

    def image_mask(self, keys: Mapping[str, set[tuple[str, Any]]] | None, exclude: list[str]
                   ) -> NDArray[np.bool_] | None:
        """Which image positions a filter and an exclusion list leave (None: all)."""
        if not keys and not exclude:
            return None
        n = self.targets["images"].n
        ok = np.ones(n, bool)
        for name, accepted in (keys or {}).items():
            by_value = self.facets.get(name, {})
            field_ok = np.zeros(n, bool)
            for key in accepted:
                rows = by_value.get(key)
                if rows:
                    field_ok[np.fromiter(rows, np.int64, len(rows))] = True
            ok &= field_ok
        for image_id in exclude:
            pos = self.row_of.get(image_id)
            if pos is not None:
                ok[pos] = False
        return ok

    def facet_values(self) -> dict[str, list[Any]]:
        out = {}
        for name in sorted(self.facets):
            present = [self.originals[name][k] for k, rows in self.facets[name].items() if rows]
            if present and len(present) <= FACET_MAX_VALUES:
                out[name] = sorted(present, key=lambda v: (str(type(v)), v))
        return out

    def live_positions(self, target: str) -> NDArray[np.int64]:
        tgt = self.targets[target]
        return np.flatnonzero(tgt.alive[: tgt.n]).astype(np.int64)
