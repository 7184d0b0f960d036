"""The `VectorStore` contract every backend implements, and the small types it speaks.

A store holds one collection: items (an image, zero or more captions, free metadata), each embedded
with one model. It searches either the images or the captions, with a metadata filter, an offset
(pagination), a minimum score and ids to leave out. Routes, the cache and the metrics only ever
speak this contract, never a backend's name, and ask a store what it can do (`compacts`, `stats`,
`writable`) rather than probe it.

Every image and every caption carries a hubness offset (−β·r, `offline/hubness.py`; 0 until one is
computed). A search ranks by `cosine + the target's offset` by default (`hubness=True`: text → image
and image → caption queries) or by the plain cosine (`hubness=False`: image → image, where a
duplicate of the query must stay first); `Hit.cosine` is always the plain cosine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from clipsearch.store.catalog import NewItem

Target = Literal["images", "captions"]
TARGETS: tuple[Target, ...] = ("images", "captions")
Scalar = str | int | float | bool
# {"field": value} (equality) or {"field": [v1, v2]} (one of); every field must match.
Filter = Mapping[str, Scalar | Sequence[Scalar]]


@dataclass(frozen=True)
class Item:
    image_id: str
    path: str  # the image file: absolute, or relative to ARTIFACTS_DIR for media the collection owns
    captions: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Hit:
    image_id: str
    score: float  # what ranks: the cosine plus the row's hubness offset (the cosine alone with hubness=False)
    cosine: float  # always the plain cosine
    caption_id: str | None = None
    caption: str | None = None


class VectorStore:
    """The contract: every operation and capability a store has is declared here (as qdrant-client's
    `QdrantBase`), so a caller asks a store, never probes it. A backend subclasses it and implements
    every operation that raises NotImplementedError here; the rest have defaults that say "not this
    store" (no search-structure statistics, no compaction of its own, nothing to close)."""

    name: str
    # Capabilities. `compacts`: `compact()` rebuilds the search structures without the tombstones
    # (FAISS); a store whose engine does that itself (Qdrant) leaves it False.
    compacts: bool = False

    @property
    def model(self) -> Mapping[str, Any]:  # ModelIdentity.to_dict() of the vectors' model
        raise NotImplementedError

    @property
    def dim(self) -> int:
        raise NotImplementedError

    @property
    def version(self) -> str:  # changes whenever the contents change; part of every cache key
        raise NotImplementedError

    @property
    def writable(self) -> bool:  # False when opened read-only: every write then raises
        return True

    @property
    def hubness(self) -> Mapping[str, Any] | None:  # how the caption offsets were made, or None
        raise NotImplementedError

    @property
    def hubness_images(self) -> Mapping[str, Any] | None:  # how the image offsets were made, or None
        raise NotImplementedError

    def count(self, target: Target = "images") -> int:
        raise NotImplementedError

    def ids(self) -> list[str]:
        raise NotImplementedError

    def get(self, image_id: str) -> Item | None:
        raise NotImplementedError

    def vector(self, image_id: str) -> NDArray[np.float32] | None:
        raise NotImplementedError

    def get_many(self, image_ids: Sequence[str]) -> list[Item | None]:
        """The items of `image_ids` in order (None where unknown): a page of results in one call."""
        return [self.get(image_id) for image_id in image_ids]

    def search(self, query: NDArray[np.float32], k: int, *, target: Target = "images",
               filter: Filter | None = None, offset: int = 0, min_score: float | None = None,
               exclude: Sequence[str] = (), hubness: bool = True) -> list[Hit]:
        raise NotImplementedError

    def add(self, items: Sequence[NewItem]) -> None:
        raise NotImplementedError

    def delete(self, image_ids: Sequence[str]) -> int:
        raise NotImplementedError

    def replace_captions(self, image_id: str, captions: Sequence[str], vectors: NDArray[np.float32],
                         offsets: NDArray[np.float32] | None = None) -> None:
        """New captions (with their vectors, shape (len(captions), dim), and their hubness offsets, one
        per caption, default 0) for an existing item; the image vector and offset stay. Raises
        StoreError for an unknown id."""
        raise NotImplementedError

    def refresh(self) -> bool:
        """Pick up changes other processes committed (e.g. an offline ingest into a served collection);
        True when the contents changed. A store whose engine is shared (a server) may return False."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Counts, model, index kind, hubness and hubness_images, metadata fields."""
        raise NotImplementedError

    def stats(self) -> dict[str, Any] | None:
        """What a service exports as metrics: per target live rows, tombstones and delta rows, and
        replayed_at_start; None where the store keeps no such structures (count() gives the sizes)."""
        return None

    def compact(self) -> dict[str, Any]:
        """Rebuild without the tombstones (only where `compacts`): {"compacted": bool, ...}."""
        raise NotImplementedError(f"{type(self).__name__} compacts itself")

    def close(self) -> None:
        """Release what the store holds open (a catalog connection, a client)."""


def value_key(value: Any) -> tuple[str, Any] | None:
    """How a metadata value is compared: numbers by value (1 == 1.0), strings and booleans as such;
    None for values no filter can name (lists, objects, null)."""
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, (int, float)):
        return ("n", float(value))
    if isinstance(value, str):
        return ("s", value)
    return None


def filter_keys(flt: Filter) -> dict[str, set[tuple[str, Any]]]:
    """The filter as field -> accepted value keys; raises ValueError for a value no item can hold."""
    out: dict[str, set[tuple[str, Any]]] = {}
    for name, wanted in flt.items():
        values = list(wanted) if isinstance(wanted, (list, tuple)) else [wanted]
        keys = set()
        for v in values:
            key = value_key(v)
            if key is None:
                raise ValueError(f"filter field {name!r}: values must be strings, numbers or booleans")
            keys.add(key)
        if not keys:
            raise ValueError(f"filter field {name!r}: give at least one value")
        out[name] = keys
    return out


def matches(metadata: Mapping[str, Any], keys: Mapping[str, set[tuple[str, Any]]]) -> bool:
    return all(value_key(metadata.get(name)) in accepted for name, accepted in keys.items())


class StoreError(ValueError):
    """A request the store cannot answer: unknown id, wrong vector dimension, bad filter."""
