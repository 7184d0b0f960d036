"""FAISS index wrapper: HNSW (inner product on normalised vectors) or exact flat, with a manifest.

A row may carry a score offset (`build(..., offsets=...)`): the stored vector is `[v, offset]` and each
query is searched as `[q, 1]`, so FAISS ranks rows by `q·v + offset` exactly, HNSW included. The caption
and image indexes of a split use it for the two hubness corrections (`clipsearch/hubness.py`); `dim`
stays the query's.

On disk an index is two files in one folder:
  `<name>.<sha12>.faiss`  the FAISS index, named by its content hash;
  `<name>.json`           the manifest sidecar, pointing at that file.
Both are written atomically and the manifest goes last, so its rename is the single commit point: a
process killed mid-write leaves the previous manifest pointing at the previous, whole index file.

An HNSW graph can leave a few rows unreachable (`clipsearch/unreachable.py`); they are listed in the
manifest (`unreachable`) and every search scores them exactly beside the graph, so none is lost.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from numpy.typing import NDArray

from clipsearch.manifest import ArtifactError, now_iso, read_json, save_with, sha256_file, write_json_atomic
from clipsearch.unreachable import unreachable_rows

log = logging.getLogger(__name__)

METRIC = "inner_product"


@dataclass(frozen=True)
class IndexParams:
    kind: str = "hnsw"  # "hnsw" or "flat"
    m: int = 16
    ef_construction: int = 200
    ef_search: int = 100

    def __post_init__(self) -> None:
        if self.kind not in ("hnsw", "flat"):
            raise ValueError(f"index kind must be 'hnsw' or 'flat', not {self.kind!r}")
        if min(self.m, self.ef_construction, self.ef_search) < 1:
            raise ValueError("M, efConstruction and efSearch must be positive")


def as_float32(vectors: np.ndarray) -> NDArray[np.float32]:
    arr = np.ascontiguousarray(vectors, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, got shape {arr.shape}")
    return arr


def build_faiss(vectors: np.ndarray, params: IndexParams) -> faiss.Index:
    x = as_float32(vectors)
    d = x.shape[1]
    if params.kind == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        index = faiss.IndexHNSWFlat(d, params.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
        index.hnsw.efSearch = params.ef_search
    index.add(x)
    return index


class VectorIndex:
    """A FAISS index plus its manifest; `search` returns (scores, row ids) like FAISS."""

    def __init__(self, index: faiss.Index, params: IndexParams, manifest: dict[str, Any]):
        self.index = index
        self.params = params
        self.manifest = manifest
        self.unreachable = self._unreachable()
        self._unreachable_x: NDArray[np.float32] | None = None  # their stored vectors, read at first search

    def _unreachable(self) -> NDArray[np.int64]:
        """The manifest's list where it holds a valid one, else found in the graph (and recorded)."""
        if self.params.kind != "hnsw":
            return np.zeros(0, np.int64)
        listed = self.manifest.get("unreachable")
        if isinstance(listed, list) and all(isinstance(i, int) and 0 <= i < self.ntotal for i in listed):
            return np.array(sorted(set(listed)), np.int64)
        rows = unreachable_rows(self.index)
        if rows.size:
            log.info("HNSW graph of %d rows leaves %d unreachable; they are searched exactly", self.ntotal, rows.size)
        self.manifest["unreachable"] = rows.tolist()
        return rows

    def unreachable_vectors(self) -> NDArray[np.float32]:
        """The stored vectors (with the offset column, if any) of the unreachable rows."""
        if self._unreachable_x is None:
            x = np.zeros((self.unreachable.size, int(self.index.d)), np.float32)
            for j, row in enumerate(self.unreachable):
                x[j] = self.index.reconstruct(int(row))
            self._unreachable_x = x
        return self._unreachable_x

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def has_offsets(self) -> bool:
        return bool(self.manifest.get("row_offsets"))

    @property
    def dim(self) -> int:
        """The query dimension (the stored one less the offset column, if any)."""
        return int(self.index.d) - int(self.has_offsets)

    def offsets(self) -> NDArray[np.float32]:
        """Each row's score offset (zeros when the index has none)."""
        out = np.zeros(self.ntotal, np.float32)
        if self.has_offsets:
            # in chunks: a full reconstruct of a large index would briefly double its memory
            for start in range(0, self.ntotal, 65536):
                n = min(65536, self.ntotal - start)
                out[start:start + n] = self.index.reconstruct_n(start, n)[:, -1]
        return out

    @classmethod
    def build(cls, vectors: np.ndarray, params: IndexParams, offsets: np.ndarray | None = None,
              **manifest_extra: Any) -> "VectorIndex":
        """`offsets`: one number per row added to every score of that row (see the module docstring)."""
        t0 = time.perf_counter()
        x = as_float32(vectors)
        dim = x.shape[1]
        if offsets is not None:
            off = np.asarray(offsets, dtype=np.float32).reshape(-1)
            if off.shape[0] != x.shape[0]:
                raise ValueError(f"{off.shape[0]} offsets for {x.shape[0]} vectors")
            if not np.all(np.isfinite(off)):
                raise ValueError("offsets must be finite")
            x = np.hstack([x, off[:, None]])
        index = build_faiss(x, params)
        manifest = {
            "kind": params.kind,
            "metric": METRIC,
            "params": asdict(params),
            "count": int(index.ntotal),
            "dim": dim,
            "row_offsets": offsets is not None,
            "build_seconds": round(time.perf_counter() - t0, 3),
            **manifest_extra,
        }
        return cls(index, params, manifest)

    def search(self, queries: np.ndarray, k: int, ef_search: int | None = None
               ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        q = as_float32(queries)
        if q.shape[1] != self.dim:
            raise ValueError(f"query dim {q.shape[1]} != index dim {self.dim}")
        k = max(1, min(int(k), self.ntotal))
        if self.has_offsets:
            q = np.hstack([q, np.ones((q.shape[0], 1), np.float32)])
        if self.params.kind == "hnsw":
            # per-call parameters keep concurrent searches with different efSearch thread-safe
            sp = faiss.SearchParametersHNSW(efSearch=max(ef_search or self.params.ef_search, k))
            scores, ids = self.index.search(q, k, params=sp)
            if self.unreachable.size:
                scores, ids = self._with_unreachable(q, k, scores, ids)
        else:
            scores, ids = self.index.search(q, k)
        return scores, ids

    def _with_unreachable(self, q: NDArray[np.float32], k: int, scores: NDArray[np.float32],
                          ids: NDArray[np.int64]) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """Merge the exact scores of the unreachable rows into the graph's top k (per query)."""
        extra = q @ self.unreachable_vectors().T
        all_scores = np.hstack([scores, extra])
        all_ids = np.hstack([ids, np.broadcast_to(self.unreachable, extra.shape)])
        all_scores = np.where(all_ids >= 0, all_scores, -np.inf)  # FAISS pads short results with -1
        order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
        top_ids = np.take_along_axis(all_ids, order, 1)
        top_scores = np.take_along_axis(all_scores, order, 1).astype(np.float32)
        return top_scores, np.where(np.isfinite(top_scores), top_ids, -1).astype(np.int64)

    def save(self, folder: str | Path, name: str) -> Path:
        """Write `<name>.<sha12>.faiss` then `<name>.json`; remove this name's older index files."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # A writer killed mid-save leaves its temporaries (never a partial file under a final name);
        # they can be as large as the index, so the next save of this name clears them.
        for stale in (*folder.glob(f"..{name}.staging.faiss.*.tmp"), *folder.glob(f".{name}.json.*.tmp")):
            stale.unlink(missing_ok=True)
        tmp_name = folder / f".{name}.staging.faiss"
        save_with(tmp_name, lambda p: faiss.write_index(self.index, str(p)))
        sha = sha256_file(tmp_name)
        final = folder / f"{name}.{sha[:12]}.faiss"
        tmp_name.replace(final)
        manifest = {**self.manifest, "index_file": final.name, "index_sha256": sha, "created": now_iso()}
        write_json_atomic(folder / f"{name}.json", manifest)
        self.manifest = manifest
        for old in folder.glob(f"{name}.*.faiss"):
            if old != final:
                old.unlink(missing_ok=True)
        return folder / f"{name}.json"

    @classmethod
    def load(cls, manifest_path: str | Path, verify: bool = True, mmap: bool = False) -> "VectorIndex":
        """`mmap`: map the index file instead of reading it (FAISS's IO_FLAG_MMAP_IFC): pages are read
        when a search touches them and shared with the page cache. Only for files never rewritten in
        place, as these are (content-named, replaced by rename)."""
        manifest_path = Path(manifest_path)
        manifest = read_json(manifest_path)
        try:
            index_path = manifest_path.parent / manifest["index_file"]
            params = IndexParams(**manifest["params"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"index manifest {manifest_path} is malformed ({exc})") from exc
        if not index_path.is_file():
            raise ArtifactError(f"index file missing: {index_path}")
        if verify and sha256_file(index_path) != manifest.get("index_sha256"):
            raise ArtifactError(f"index file {index_path.name} does not match its manifest (corrupt?)")
        try:
            index = faiss.read_index(str(index_path), faiss.IO_FLAG_MMAP_IFC if mmap else 0)
        except RuntimeError as exc:
            raise ArtifactError(f"cannot read FAISS index {index_path.name}: corrupt file") from exc
        stored_dim = manifest.get("dim")
        if isinstance(stored_dim, int) and manifest.get("row_offsets"):
            stored_dim += 1
        if index.ntotal != manifest.get("count") or index.d != stored_dim:
            raise ArtifactError(f"index {index_path.name} has {index.ntotal}x{index.d} vectors, "
                                f"manifest says {manifest.get('count')}x{stored_dim}")
        return cls(index, params, manifest)


def recall_vs_exact(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean overlap |approx top-k ∩ exact top-k| / k (FAISS's "k-recall@k")."""
    k = exact_ids.shape[1]
    hits = sum(len(set(a[a >= 0]) & set(e)) for a, e in zip(approx_ids[:, :k], exact_ids))
    return hits / (k * exact_ids.shape[0])
