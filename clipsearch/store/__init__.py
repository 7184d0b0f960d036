"""Collections' vector storage behind one contract (`VectorStore`) and one way to open it.

`open_store(layout, name, store=...)` is what the service and the offline stages call. `store` says
which backend holds the collections (CLIPSEARCH_STORE, `--store`):
  "faiss"              the embedded FAISS + SQLite store under ARTIFACTS_DIR (`faiss_store.py`), the default;
  "http(s)://host:6333" a Qdrant server or cluster (`qdrant_store.py`; `api_key` for its API key);
  "qdrant:PATH"        qdrant-client's local mode in the folder PATH (one process at a time), or
                       "qdrant::memory:" for a throw-away in-memory one.
"""

from __future__ import annotations

from typing import Any

from clipsearch.artifacts import ArtifactLayout
from clipsearch.store.base import TARGETS, Filter, Hit, Item, StoreError, Target, VectorStore
from clipsearch.store.catalog import Catalog, NewItem
from clipsearch.store.faiss_store import EXACT_MAX, FaissStore

FAISS = "faiss"


def check_store_spec(spec: str) -> str:
    """`spec` if it names a backend this project speaks, else ValueError saying which it accepts."""
    spec = spec.strip()
    if spec == FAISS or (spec.startswith(("http://", "https://")) and spec.split("://", 1)[1]):
        return spec
    if spec.startswith("qdrant:") and spec[len("qdrant:"):].strip():
        return spec
    raise ValueError(f"store {spec!r} must be 'faiss', a Qdrant URL (http://host:6333) or qdrant:PATH "
                     "(qdrant-client local mode)")


def qdrant_location(spec: str, api_key: str | None = None):
    """The Qdrant location a store spec names (None for the embedded FAISS store)."""
    spec = check_store_spec(spec)
    if spec == FAISS:
        return None
    from clipsearch.store.qdrant_connection import QdrantLocation

    if spec.startswith("qdrant:"):
        return QdrantLocation(path=spec[len("qdrant:"):])
    return QdrantLocation(url=spec, api_key=api_key or None)


def open_store(layout: ArtifactLayout, name: str, *, readonly: bool = True, store: str = FAISS,
               api_key: str | None = None, **options: Any) -> VectorStore:
    """The collection `name` (options: params; for FAISS also exact_max, verify)."""
    location = qdrant_location(store, api_key)
    if location is None:
        return FaissStore.open(layout.collection(name), readonly=readonly, **options)
    from clipsearch.store.qdrant_store import QdrantStore

    return QdrantStore.open(location, name, readonly=readonly, params=options.get("params"))


def collection_names(layout: ArtifactLayout, store: str = FAISS, api_key: str | None = None) -> list[str]:
    """The collections the store holds, sorted by name."""
    location = qdrant_location(store, api_key)
    if location is None:
        return layout.collection_names()
    from clipsearch.store.qdrant_store import list_collections

    return list_collections(location)


__all__ = ["EXACT_MAX", "FAISS", "TARGETS", "Catalog", "FaissStore", "Filter", "Hit", "Item", "NewItem",
           "StoreError", "Target", "VectorStore", "check_store_spec", "collection_names", "open_store",
           "qdrant_location"]
