"""The `migrate` stage: copy a collection's catalog (FAISS store) to a Qdrant store without re-embedding.

    python -m offline migrate --collection flickr8k --to http://localhost:6333
    python -m offline migrate --collection flickr8k --to qdrant:/var/lib/clipsearch/qdrant

Everything the catalog holds goes: items (path, metadata), image vectors and their hubness offsets,
captions with their vectors and hubness offsets, the two hubness records (`hubness`,
`hubness_images`) and the model identity. Idempotent: the target records the
catalog's uid and sequence number it was copied from, so a second run with nothing changed does
nothing; after a change it upserts every item again (point ids are derived from the ids, so this
overwrites rather than duplicates) and deletes what the catalog no longer holds. `force` drops the
target and copies afresh, as does a target made before image offsets existed (its images have no
offset column: `clipsearch/store/qdrant_store.py`). `ingest --store` runs this after ingesting into
the catalog.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from tqdm import tqdm

from clipsearch.artifacts import ArtifactLayout
from clipsearch.collection import Collection
from clipsearch.index import IndexParams
from clipsearch.manifest import ArtifactError
from clipsearch.store import Catalog, NewItem, qdrant_location
from clipsearch.store.qdrant_store import QdrantStore, qdrant_names

log = logging.getLogger(__name__)

BATCH = 256  # items per write (each with its captions)


def migrate_catalog(catalog: Catalog, name: str, to: str, *, api_key: str | None = None,
                    params: IndexParams | None = None, force: bool = False, progress: bool = True,
                    shards: int | None = None, replicas: int | None = None) -> dict[str, Any]:
    """Copy `catalog` into the collection `name` of the Qdrant store `to` (a URL or qdrant:PATH);
    `shards`/`replicas` place a collection it creates on a cluster."""
    t0 = time.perf_counter()
    location = qdrant_location(to, api_key)
    if location is None:
        raise ValueError("--to must name a Qdrant store (http://host:6333 or qdrant:PATH), not 'faiss'")
    model, dim = catalog.model(), catalog.dim
    if model is None or dim is None:
        raise ArtifactError(f"collection {name!r} names no model; re-ingest it")
    source = {"uid": catalog.get_meta("uid"), "seq": catalog.seq}
    store = _target(location, name, model, dim, params, force,
                    {"shard_number": shards, "replication_factor": replicas})
    try:
        if not force and store.meta.get("source") == source:
            log.info("migrate %s: the target is up to date with the catalog (seq %d)", name, source["seq"])
            return _summary(store, name, to, 0, 0, t0, up_to_date=True)
        rows = catalog.rows()
        target = Collection(store)
        by_image: list[list[int]] = [[] for _ in rows.image_ids]
        for c, img_row in enumerate(rows.caption_image_rows):
            by_image[int(img_row)].append(c)
        n = len(rows.image_ids)
        with tqdm(total=n, desc=f"migrating {name}", unit="item", disable=not progress) as bar:
            for start in range(0, n, BATCH):
                items = []
                for r in range(start, min(n, start + BATCH)):
                    caps = by_image[r]
                    items.append(NewItem(rows.image_ids[r], rows.paths[r], rows.vectors[r],
                                         tuple(rows.caption_texts[c] for c in caps),
                                         rows.caption_vectors[caps] if caps else None, rows.metadata[r],
                                         caption_ids=tuple(rows.caption_ids[c] for c in caps),
                                         offset=float(rows.image_offsets[r]),
                                         caption_offsets=rows.caption_offsets[caps] if caps else None))
                target.add_embedded(items, keep_offsets=True)  # the catalog's offsets, as they are
                bar.update(len(items))
        stale = sorted(set(store.ids()) - set(rows.image_ids))
        removed = store.delete(stale) if stale else 0
        store.set_hubness(catalog.hubness())
        store.set_hubness_images(catalog.hubness_images())
        store.set_source({**source, "seq": rows.seq})
        return _summary(store, name, to, n, removed, t0, up_to_date=False)
    finally:
        store.close()


def migrate(out: str, collection: str, to: str, **kwargs: Any) -> dict[str, Any]:
    """`python -m offline migrate`: the collection under `out` (ARTIFACTS_DIR) to the store `to`."""
    coll = ArtifactLayout(out).collection(collection)
    if not coll.catalog.is_file():
        raise ArtifactError(f"collection {collection!r} has no catalog in {coll.dir}; ingest it first")
    with Catalog(coll.catalog, readonly=True) as catalog:
        return migrate_catalog(catalog, collection, to, **kwargs)


def _target(location, name: str, model: dict[str, Any], dim: int, params: IndexParams | None,
            force: bool, placement: dict[str, int | None]) -> QdrantStore:
    try:
        store = QdrantStore.open(location, name, readonly=False, params=params)
    except ArtifactError:
        return QdrantStore.create(location, name, model, dim, params, replace=True, **placement)
    if not force and (store.model != model or store.dim != dim):
        store.close()
        raise ArtifactError(f"collection {name!r} in the Qdrant store holds {store.model.get('model')} "
                            f"vectors, the catalog {model.get('model')}; pass --force to replace it")
    if force or not store.image_offsets:
        if not store.image_offsets:
            log.info("migrate %s: the Qdrant collection predates image hubness offsets; making it afresh", name)
        store.close()
        return QdrantStore.create(location, name, model, dim, params, replace=True, **placement)
    return store


def _summary(store: QdrantStore, name: str, to: str, copied: int, removed: int, t0: float,
             up_to_date: bool) -> dict[str, Any]:
    info = store.describe()
    return {"collection": name, "to": to, "qdrant_collections": qdrant_names(name), "up_to_date": up_to_date,
            "copied_items": copied, "removed_items": removed, "images": info["images"],
            "captions": info["captions"], "version": info["version"],
            "seconds": round(time.perf_counter() - t0, 2)}


__all__ = ["migrate", "migrate_catalog"]
