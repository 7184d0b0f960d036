"""How catalog rows are laid out in the live state (`clipsearch.store.live`) of a FaissStore.

At start-up the rows go at the positions of the HNSW snapshot they are unchanged since (the rest
appended: the replay), after a catch-up they are upserted, and after a compaction the state is laid
out again around the new graphs. Each row carries its hubness offset (images and captions alike)
wherever it goes. Every function here runs under the store's lock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

from clipsearch.index import VectorIndex
from clipsearch.store.base import Item
from clipsearch.store.catalog import CatalogRows
from clipsearch.store.live import Live

__all__ = ["apply_rows", "place_captions", "place_images", "relayout"]


def apply_rows(live: Live, rows: CatalogRows, which: Sequence[int] | range) -> None:
    """Upsert items `which` of `rows` (with their captions) into `live`."""
    caps_by_item: dict[int, list[int]] = {}
    for j, img_row in enumerate(rows.caption_image_rows):
        caps_by_item.setdefault(int(img_row), []).append(j)
    has_offsets = rows.caption_offsets.size and np.any(rows.caption_offsets)
    image_offsets = rows.image_offsets if rows.image_offsets.size == len(rows.image_ids) else None
    for i in which:
        js = caps_by_item.get(i, [])
        item = Item(rows.image_ids[i], rows.paths[i], tuple(rows.caption_texts[j] for j in js), rows.metadata[i])
        live.put(item, rows.vectors[i], [rows.caption_ids[j] for j in js],
                 rows.caption_vectors[js] if js else np.zeros((0, live.dim), np.float32),
                 rows.caption_offsets[js] if js and has_offsets else None,
                 float(image_offsets[i]) if image_offsets is not None else 0.0)


def place_images(live: Live, rows: CatalogRows, snap: tuple[VectorIndex, int, list[str] | None] | None,
                 offsets: NDArray[np.float32] | None = None) -> int:
    """Lay the images out (with `offsets`, their hubness offsets in row order; None: all 0): at the
    snapshot's positions where the row is unchanged since it, the rest appended. Returns how many
    changes after the snapshot were replayed."""
    images = live.targets["images"]
    if snap is None:
        _add_images(live, rows, range(len(rows.image_ids)), offsets)
        return 0
    index, snap_seq, ids = snap
    if ids is None:  # an older snapshot, exactly current: its positions are the catalog rows
        _add_images(live, rows, range(len(rows.image_ids)), offsets)
        images.index, images.index_seq, images.index_ids = index, snap_seq, list(rows.image_ids)
        return 0
    row_of = {image_id: i for i, image_id in enumerate(rows.image_ids)}
    placed = [row_of.get(i, -1) for i in ids]
    placed = [r if r >= 0 and rows.item_seqs[r] <= snap_seq else -1 for r in placed]
    used = {r for r in placed if r >= 0}
    replayed = sum(1 for i in ids if i not in row_of)  # deleted since the snapshot (rewritten: counted below)
    # the snapshot's positions first (dead where the row changed), then the changed and new rows
    alive = np.array([r >= 0 for r in placed], bool)
    vecs = np.zeros((len(ids), live.dim), np.float32)
    offs = np.zeros(len(ids), np.float32)
    if used:
        good = np.flatnonzero(alive)
        src = [placed[p] for p in good]
        vecs[good] = rows.vectors[src]
        if offsets is not None:
            offs[good] = offsets[src]
    images.append(vecs, offs if offsets is not None else None, np.arange(len(ids), dtype=np.int64), alive)
    for pos, (image_id, r) in enumerate(zip(ids, placed)):
        live.image_ids.append(image_id)
        if r < 0:
            live.items.append(None)
            continue
        item = Item(image_id, rows.paths[r], (), rows.metadata[r])
        live.items.append(item)
        live.row_of[image_id] = pos
        live._index_metadata(pos, item.metadata)
    rest = [i for i in range(len(rows.image_ids)) if i not in used]
    replayed += sum(1 for i in rest if rows.item_seqs[i] > snap_seq)
    _add_images(live, rows, rest, offsets)
    images.index, images.index_seq, images.index_ids = index, snap_seq, list(ids)
    return replayed


def _add_images(live: Live, rows: CatalogRows, which: Sequence[int] | range,
                offsets: NDArray[np.float32] | None) -> None:
    which = list(which)
    images = live.targets["images"]
    start = images.n
    images.append(rows.vectors[which] if which else np.zeros((0, live.dim), np.float32),
                  offsets[which] if offsets is not None and which else None,
                  np.arange(start, start + len(which), dtype=np.int64))
    for k, i in enumerate(which):
        pos = start + k
        item = Item(rows.image_ids[i], rows.paths[i], (), rows.metadata[i])
        live.image_ids.append(item.image_id)
        live.items.append(item)
        live.row_of[item.image_id] = pos
        live._index_metadata(pos, item.metadata)


def place_captions(live: Live, rows: CatalogRows, snap: tuple[VectorIndex, int, list[str] | None] | None,
                    offsets: NDArray[np.float32] | None) -> int:
    caps = live.targets["captions"]
    image_pos = np.array([live.row_of[rows.image_ids[int(r)]] for r in rows.caption_image_rows], np.int64)
    order: list[int] = list(range(len(rows.caption_ids)))
    replayed = 0
    if snap is not None and snap[2] is not None:
        index, snap_seq, ids = snap
        row_of = {cid: j for j, cid in enumerate(rows.caption_ids)}
        placed = [row_of.get(c, -1) for c in ids]
        placed = [j if j >= 0 and rows.caption_seqs[j] <= snap_seq else -1 for j in placed]
        used = {j for j in placed if j >= 0}
        gone = sum(1 for c in ids if c not in row_of)
        alive = np.array([j >= 0 for j in placed], bool)
        good = np.flatnonzero(alive)
        vecs = np.zeros((len(ids), live.dim), np.float32)
        offs = np.zeros(len(ids), np.float32)
        img = np.zeros(len(ids), np.int64)
        src = [placed[p] for p in good]
        vecs[good] = rows.caption_vectors[src]
        if offsets is not None:
            offs[good] = offsets[src]
        img[good] = image_pos[src]
        caps.append(vecs, offs if offsets is not None else None, img, alive)
        texts = [""] * len(ids)
        for p, j in zip(good, src):
            texts[p] = rows.caption_texts[j]
            live.captions_of.setdefault(int(img[p]), []).append(int(p))
        live.caption_ids.extend(ids)
        live.caption_texts.extend(texts)
        caps.index, caps.index_seq, caps.index_ids = index, snap_seq, list(ids)
        order = [j for j in range(len(rows.caption_ids)) if j not in used]
        replayed = gone + sum(1 for j in order if rows.caption_seqs[j] > snap_seq)
    elif snap is not None:
        caps.index, caps.index_seq, caps.index_ids = snap[0], snap[1], list(rows.caption_ids)
    if order:
        start = caps.n
        caps.append(rows.caption_vectors[order], offsets[order] if offsets is not None else None, image_pos[order])
        live.caption_ids.extend(rows.caption_ids[j] for j in order)
        live.caption_texts.extend(rows.caption_texts[j] for j in order)
        for k, j in enumerate(order):
            live.captions_of.setdefault(int(image_pos[j]), []).append(start + k)
    # the items' caption lists, in caption row order
    texts_of: dict[int, list[str]] = {}
    for j in range(len(rows.caption_ids)):
        texts_of.setdefault(int(image_pos[j]), []).append(rows.caption_texts[j])
    for pos, texts in texts_of.items():
        item = live.items[pos]
        if item is not None:
            live.items[pos] = Item(item.image_id, item.path, tuple(texts), item.metadata)
    return replayed


def relayout(old: Live, captured: Mapping[str, NDArray[np.int64]], indexes: Mapping[str, VectorIndex | None],
              seq: int, ids: Mapping[str, list[str]]) -> Live:
    """A fresh state whose first positions are the rows each new graph was built from (dead where they
    died during the build), then every live row the build did not see. Called under the store lock."""
    new = Live(old.dim, old.seq, old.uid, old.hubness, hubness_images=old.hubness_images)
    new.facets, new.originals = {}, {}
    src_img = old.targets["images"]
    seen = np.zeros(src_img.n, bool)
    seen[captured["images"]] = True
    img_order = np.concatenate([captured["images"], np.flatnonzero(src_img.alive[: src_img.n] & ~seen)]).astype(np.int64)
    new_pos = np.full(src_img.n, -1, np.int64)
    new_pos[img_order] = np.arange(len(img_order))
    alive = src_img.alive[img_order]
    new.targets["images"].append(src_img.vectors[img_order],
                                 src_img.offsets[img_order] if src_img.has_offsets else None,
                                 np.arange(len(img_order), dtype=np.int64), alive)
    for pos, p in enumerate(img_order):
        image_id = old.image_ids[p]
        new.image_ids.append(image_id)
        item = old.items[p] if alive[pos] else None
        new.items.append(item)
        if item is not None:
            new.row_of[image_id] = pos
            new._index_metadata(pos, item.metadata)
    src_cap = old.targets["captions"]
    seen = np.zeros(src_cap.n, bool)
    seen[captured["captions"]] = True
    cap_order = np.concatenate([captured["captions"], np.flatnonzero(src_cap.alive[: src_cap.n] & ~seen)]).astype(np.int64)
    cap_alive = src_cap.alive[cap_order]
    img_rows = new_pos[src_cap.image_rows[cap_order]]
    cap_alive &= img_rows >= 0
    img_rows[img_rows < 0] = 0
    new.targets["captions"].append(src_cap.vectors[cap_order], src_cap.offsets[cap_order] if src_cap.has_offsets else None,
                                   img_rows, cap_alive)
    for pos, p in enumerate(cap_order):
        new.caption_ids.append(old.caption_ids[p])
        new.caption_texts.append(old.caption_texts[p])
        if cap_alive[pos]:
            new.captions_of.setdefault(int(img_rows[pos]), []).append(pos)
    for target in ("images", "captions"):
        tgt = new.targets[target]
        tgt.index = indexes[target]
        tgt.index_seq = seq
        tgt.index_ids = list(ids[target]) if tgt.index is not None else []
    return new
