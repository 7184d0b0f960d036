"""The search kernels of a FaissStore target: exact top-k over the allowed rows, and an HNSW graph
searched beside the exact "delta" of the rows appended after it.

Scores are `cosine + offset` where the view carries offsets (the hubness correction) and the plain
cosine where it does not. A graph built with offsets stores `[v, offset]`: it is searched with `[q, 1]`
for the first, `[q, 0]` for the second."""

from __future__ import annotations

import faiss
import numpy as np
from numpy.typing import NDArray

from clipsearch.store.live import View

__all__ = ["exact_top", "hnsw_and_delta"]


def exact_top(vectors: NDArray[np.float32], offsets: NDArray[np.float32] | None, q: NDArray[np.float32], need: int,
           allowed: NDArray[np.bool_] | None, base: int = 0) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """The top `need` rows (positions + `base`) by score among the allowed ones, ties by position."""
    if allowed is not None and allowed.sum() * 2 < allowed.size:  # few rows left: score only those
        rows = np.flatnonzero(allowed)
        scores = vectors[rows] @ q
        if offsets is not None:
            scores += offsets[rows]
    else:
        scores = vectors @ q
        if offsets is not None:
            scores = scores + offsets
        rows = np.arange(vectors.shape[0])
        if allowed is not None:
            rows = np.flatnonzero(allowed)
            scores = scores[rows]
    if scores.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    need = min(need, scores.shape[0])
    top = np.argpartition(-scores, need - 1)[:need] if need < scores.shape[0] else np.arange(scores.shape[0])
    # ties broken by row, so equal scores always come back in the same order
    order = top[np.lexsort((rows[top], -scores[top]))]
    return rows[order].astype(np.int64) + base, scores[order]


def hnsw_and_delta(view: View, q: NDArray[np.float32], need: int) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """The graph over its positions (tombstones and filtered rows left out by an ID selector), the
    rows the graph cannot reach and the delta after it exactly, merged by score."""
    index = view.index
    assert index is not None
    m = index.ntotal
    allowed = view.allowed
    rows, scores = np.zeros(0, np.int64), np.zeros(0, np.float32)
    head = allowed[:m] if allowed is not None else None
    if head is None or head.any():
        k = min(need, m)
        if index.has_offsets:
            query = np.hstack([q, np.full((1, 1), 1.0 if view.hubness else 0.0, np.float32)])
        else:
            query = q
        sel = None
        if head is not None:
            banned = np.flatnonzero(~head).astype(np.int64)
            sel = (faiss.IDSelectorNot(faiss.IDSelectorBatch(banned)) if banned.size < head.size // 2
                   else faiss.IDSelectorBatch(np.flatnonzero(head).astype(np.int64)))
        sp = faiss.SearchParametersHNSW(efSearch=max(index.params.ef_search, k), sel=sel)
        s, ids = index.index.search(query, k, params=sp)
        keep = ids[0] >= 0
        rows, scores = ids[0][keep].astype(np.int64), s[0][keep]
        cut_off = index.unreachable  # rows the graph never returns (clipsearch/unreachable.py): exactly
        if cut_off.size:
            ok = head[cut_off] if head is not None else None
            u_rows, u_scores = exact_top(view.vectors[cut_off], view.offsets[cut_off] if view.offsets is not None
                                         else None, q[0], need, ok)
            rows, scores = _merge(rows, scores, cut_off[u_rows], u_scores, need)
    n = view.vectors.shape[0]
    if n > m:
        tail = allowed[m:] if allowed is not None else None
        if tail is None or tail.any():
            d_rows, d_scores = exact_top(view.vectors[m:], view.offsets[m:] if view.offsets is not None else None,
                                      q[0], need, tail, base=m)
            rows, scores = _merge(rows, scores, d_rows, d_scores, need)
    return rows, scores


def _merge(rows: NDArray[np.int64], scores: NDArray[np.float32], more_rows: NDArray[np.int64],
           more_scores: NDArray[np.float32], need: int) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """The top `need` of two disjoint ranked lists, ties by row."""
    rows, scores = np.concatenate([rows, more_rows]), np.concatenate([scores, more_scores])
    order = np.lexsort((rows, -scores))[:need]
    return rows[order], scores[order]
