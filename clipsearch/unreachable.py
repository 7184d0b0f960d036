"""The rows an HNSW graph can never return: nodes no search can walk to from the entry point.

HNSW keeps each node's out-edges and prunes them by a diversity heuristic, so a node whose every
in-edge was pruned away is unreachable: no query, not even its own vector at any efSearch, visits
it, and the photo is missing from every search although it is stored. Near-duplicates make it likely
(a burst of nearly identical shots; the crash test's fake vectors, where 1 of 199 nodes was cut off
and its own image found another at rank 1 with efSearch 400 > n).

`unreachable_rows` finds them with one breadth-first walk over the graph's edges (all levels) from
the entry point, vectorised over each frontier; the index searches these rows exactly beside the
graph (`VectorIndex.search`, `clipsearch.store.kernels.hnsw_and_delta`), so every row stays
findable. The graph is never changed after it is built, so the set is computed once, at build (or
at the load of a snapshot saved before this existed) and kept in the index's manifest.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
from numpy.typing import NDArray

__all__ = ["unreachable_rows"]


def _int_view(vec: Any, dtype: type) -> NDArray:
    """A numpy view of a FAISS integer vector (of `dtype`) without copying it (the graph can be ~128 MB
    at 1M rows)."""
    n = int(vec.size())
    return np.asarray(faiss.rev_swig_ptr(vec.data(), n)) if n else np.zeros(0, dtype)


def unreachable_rows(index: faiss.Index) -> NDArray[np.int64]:
    """Positions of an `IndexHNSW*` that a search from its entry point cannot reach (sorted; empty for
    an index without a graph or with no rows)."""
    hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
    n = int(index.ntotal)
    if hnsw is None or n == 0 or hnsw.entry_point < 0:
        return np.zeros(0, np.int64)
    neighbors = _int_view(hnsw.neighbors, np.int32)
    offsets = _int_view(hnsw.offsets, np.uint64).astype(np.int64)
    seen = np.zeros(n, bool)
    seen[hnsw.entry_point] = True
    frontier = np.array([hnsw.entry_point], np.int64)
    while frontier.size:
        starts, ends = offsets[frontier], offsets[frontier + 1]
        lengths = ends - starts
        # every edge slot of every frontier node, at every level: start + 0..length-1
        slots = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(int(lengths.sum()))
        found = neighbors[slots]
        found = found[found >= 0]  # -1 pads the unused slots
        found = np.unique(found[~seen[found]]).astype(np.int64)
        seen[found] = True
        frontier = found
    return np.flatnonzero(~seen).astype(np.int64)
