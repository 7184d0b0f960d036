"""Collections' vector storage behind one contract (`VectorStore`) and one way to open it.

`open_store(layout, name)` is what the service and the offline stages call; today it returns the
embedded FAISS + SQLite store (`faiss_store.py`, over `catalog.py`).
"""

from __future__ import annotations

from typing import Any

from clipsearch.artifacts import ArtifactLayout
from clipsearch.store.base import TARGETS, Filter, Hit, Item, StoreError, Target, VectorStore
from clipsearch.store.catalog import Catalog, NewItem
from clipsearch.store.faiss_store import EXACT_MAX, FaissStore


def open_store(layout: ArtifactLayout, name: str, *, readonly: bool = True, **options: Any) -> VectorStore:
    """The collection `name` under `layout` (options: params, exact_max, verify)."""
    return FaissStore.open(layout.collection(name), readonly=readonly, **options)


__all__ = ["EXACT_MAX", "TARGETS", "Catalog", "FaissStore", "Filter", "Hit", "Item", "NewItem", "StoreError",
           "Target", "VectorStore", "open_store"]
