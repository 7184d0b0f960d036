"""Backends for the store contract tests: the same tiny collection in FaissStore and QdrantStore.

A `Backend` makes an empty store on disk under tmp_path, reopens it from disk (or opens a second,
read-only one beside it), and sets caption and image offsets (the hubness correction) the way each
backend is given them: through the catalog for FAISS (as `offline ingest` does), by writing the items
again with their offsets for Qdrant (as `offline migrate` does).
Qdrant runs in qdrant-client's local mode (inserts ~6-20 ms a point here), so collections stay tiny.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from qdrant_client import models

from clipsearch.artifacts import ArtifactLayout
from clipsearch.store import Catalog, FaissStore, NewItem
from clipsearch.store.qdrant_store import QdrantLocation, QdrantStore

DIM = 8
MODEL = {"model": "fake-contract", "pretrained": None, "checkpoint_sha256": None, "embed_dim": DIM}


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_items(seed: int = 0) -> list[NewItem]:
    """8 items, 0-3 captions each; metadata of every kind a filter can name (str, int, float, bool),
    one list value no filter can name, and one field with a value per item."""
    rng = np.random.default_rng(seed)
    kinds = ["cat", "dog", "cat", "bird", "dog", "cat", "bird", "dog"]
    items = []
    for i in range(8):
        n_caps = i % 4
        meta = {"kind": kinds[i], "year": 2020 + i % 3, "score": [1, 1.0, 2.5][i % 3], "flag": i % 2 == 0,
                "tags": ["x", "y"], "uid": f"u{i}"}
        if i == 7:
            meta["flag"] = 1  # the number 1, which a boolean filter must not match
        items.append(NewItem(f"img{i}.jpg", f"/data/img{i}.jpg", unit(rng, 1)[0],
                             captions=tuple(f"caption {j} of image {i}" for j in range(n_caps)),
                             caption_vectors=unit(rng, n_caps) if n_caps else None, metadata=meta))
    return items


class Backend:
    kind = ""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.opened: list = []

    def create(self):  # an empty, writable store
        raise NotImplementedError

    def reopen(self, store):
        raise NotImplementedError

    def reader(self, store):  # a second, read-only store on the same collection, beside `store`
        raise NotImplementedError

    def set_offsets(self, store, items: list[NewItem], offsets: Mapping[str, float]) -> None:
        raise NotImplementedError

    def set_image_offsets(self, store, items: list[NewItem], offsets: Mapping[str, float]) -> None:
        """Every image's offset (by image id; the rest 0), with the record {"beta": 0.25}."""
        raise NotImplementedError

    def close_all(self) -> None:
        for s in self.opened:
            s.close()


class FaissBackend(Backend):
    kind = "faiss"

    def create(self):
        layout = ArtifactLayout(self.tmp_path / "artifacts").collection("contract")
        with Catalog(layout.catalog) as cat:
            cat.set_model(MODEL, DIM)
        store = FaissStore.open(layout, readonly=False)
        self.opened.append(store)
        return store

    def reopen(self, store):
        store.close()
        again = FaissStore.open(store.layout, readonly=True)
        self.opened.append(again)
        return again

    def reader(self, store):
        other = FaissStore.open(store.layout, readonly=True)
        self.opened.append(other)
        return other

    def set_image_offsets(self, store, items, offsets):
        rows, _ = store.catalog.image_vectors()
        ids = store.catalog.rows().image_ids  # in row order, as image_vectors gives the rows
        store.catalog.set_image_offsets(rows, np.array([offsets.get(i, 0.0) for i in ids], np.float32),
                                        {"beta": 0.25})
        store.refresh()

    def set_offsets(self, store, items, offsets):
        rows, _ = store.catalog.caption_vectors()
        ids = [cid for it in items for cid in (it.caption_ids or [f"{it.image_id}#{j}" for j in range(len(it.captions))])]
        store.catalog.set_caption_offsets(rows, np.array([offsets.get(c, 0.0) for c in ids], np.float32),
                                          {"beta": 0.5})
        store.refresh()  # the offsets were written past the store, as the ingest stage writes them


class QdrantBackend(Backend):
    kind = "qdrant"

    def create(self):
        self.location = QdrantLocation(path=str(self.tmp_path / "qdrant"))
        store = QdrantStore.create(self.location, "contract", MODEL, DIM)
        self.opened.append(store)
        return store

    def reopen(self, store):
        store.close()
        again = QdrantStore.open(self.location, "contract", readonly=True)
        self.opened.append(again)
        return again

    def reader(self, store):
        other = QdrantStore.open(self.location, "contract", readonly=True)
        self.opened.append(other)
        return other

    def set_image_offsets(self, store, items, offsets):
        current = {it.image_id: it for it in items}
        store.add([replace(it, offset=offsets.get(it.image_id, 0.0)) for it in current.values()])
        store.set_hubness_images({"beta": 0.25})

    def set_offsets(self, store, items, offsets):
        per_item = [np.array([offsets.get(c, 0.0) for c in
                              (it.caption_ids or [f"{it.image_id}#{j}" for j in range(len(it.captions))])],
                             np.float32) for it in items]
        store.add(items, caption_offsets=per_item)
        store.set_hubness({"beta": 0.5})


def make_pre_offset_images(location: QdrantLocation, name: str) -> None:
    """The collection `name` as QdrantStore made it before image offsets: images of size dim."""
    QdrantStore.create(location, name, MODEL, DIM).close()
    store = QdrantStore.open(location, name, readonly=False)
    try:
        qname = store.names["images"]
        meta = store.client.get_collection(qname).config.metadata
        store.client.delete_collection(qname)
        store.client.create_collection(qname, metadata=meta, vectors_config=models.VectorParams(
            size=DIM, distance=models.Distance.DOT))
    finally:
        store.close()


BACKENDS = {"faiss": FaissBackend, "qdrant": QdrantBackend}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request, tmp_path: Path) -> Iterator[Backend]:
    b = BACKENDS[request.param](tmp_path)
    yield b
    b.close_all()


@pytest.fixture(scope="session")
def contract() -> SimpleNamespace:
    return SimpleNamespace(DIM=DIM, MODEL=MODEL, make_items=make_items, unit=unit, backends=BACKENDS,
                           make_pre_offset_images=make_pre_offset_images)
