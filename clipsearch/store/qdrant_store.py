"""The scale-out `VectorStore`: one collection in Qdrant, through the official `qdrant-client`.

The same client speaks to a Qdrant server or cluster (`http://host:6333`) and to its local mode
(`QdrantClient(path=...)` or `":memory:"`: a Python re-implementation with exact search, used by the
tests and small setups; it locks its folder, so one process at a time).

How a collection maps onto Qdrant: two Qdrant collections, `<name>__images` and `<name>__captions`.
  images    one point per item, id uuid5("clipsearch:image:<image_id>"), vector: [v, offset] (dim + 1:
            the image embedding and its hubness offset); payload: image_id, path, captions,
            caption_ids, metadata, facets, order, offset.
  captions  one point per caption, id uuid5("clipsearch:caption:<caption_id>"), vector: [v, offset]
            (dim + 1); payload: image_id, caption_id, caption, offset, facets, order.
Both are searched with [q, 1] (rank by `cosine + hubness offset`: text → image, image → caption) or
[q, 0] (`hubness=False`: the plain cosine, image → image), so the engine itself ranks, HNSW included
(the trick `clipsearch/index.py` uses for FAISS): no over-fetch and re-rank, and the ranking is
FaissStore's. The distance is the dot product (on L2-normalised embeddings: the cosine).
The collection's identity (model, dim, hubness records, a uid, the write sequence number, index
parameters) is the images collection's metadata (Qdrant >= 1.16 keeps it with the collection).

An images collection made before image offsets existed holds vectors of size dim (no offset
column). It still opens and serves (every image offset 0); a write that gives an image a non-zero
offset is refused with a StoreError saying to re-migrate (`python -m offline migrate`, which makes
such a collection afresh in the current layout and copies every offset from the catalog).

Filters: every scalar metadata value is also written to the keyword list `facets` as
"field=<kind>:<value>" with the kind and value of `value_key` (numbers by value, so 1 == 1.0;
booleans and strings apart). An equality or one-of filter is one `MatchAny` on `facets` per field,
so the semantics equal FaissStore's exactly, for any field name, and one keyword payload index
(`facets`, plus `image_id` for exclusions) serves every field.

Writes use `wait=True`, so a read after a write sees it. Qdrant has no transaction across points:
a write interrupted half-way leaves some points written; writing the same items again (ingest,
migrate) is idempotent because the point ids are derived from the item and caption ids.
"""

from __future__ import annotations

import json
import threading
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from qdrant_client import QdrantClient, models

from clipsearch.index import IndexParams
from clipsearch.manifest import ArtifactError, sha256_json
from clipsearch.store.base import Filter, Hit, Item, StoreError, Target, VectorStore, filter_keys, value_key
from clipsearch.store.catalog import NewItem
from clipsearch.store.qdrant_connection import POOL, QdrantLocation

# QdrantLocation and POOL are re-exported: callers open a store and its location from one module.
__all__ = ["POOL", "QdrantLocation", "QdrantStore", "caption_point_id", "facet_key", "facets_of",
           "image_point_id", "list_collections", "qdrant_names"]

STORE_FORMAT = 1
# Metadata fields with at most this many distinct values are offered as filter choices (as FaissStore).
FACET_MAX_VALUES = 50
UPSERT_BATCH = 256  # points per upsert request
SCROLL_BATCH = 1024
_NS = uuid.UUID("6f1c1d2e-8a43-4c59-9a57-0c1f4f3d2b10")  # the namespace of every point id
_SUFFIX = {"images": "__images", "captions": "__captions"}


def image_point_id(image_id: str) -> str:
    return str(uuid.uuid5(_NS, f"clipsearch:image:{image_id}"))


def caption_point_id(caption_id: str) -> str:
    return str(uuid.uuid5(_NS, f"clipsearch:caption:{caption_id}"))


def qdrant_names(name: str) -> dict[str, str]:
    """The Qdrant collections that hold the engine collection `name`."""
    return {t: name + s for t, s in _SUFFIX.items()}


def facet_key(field: str, value: Any) -> str | None:
    """How one metadata value is written to (and matched in) `facets`; None for unfilterable values."""
    key = value_key(value)
    if key is None:
        return None
    kind, v = key
    text = json.dumps(v) if kind != "s" else v  # numbers as float (1 and 1.0 alike), booleans true/false
    return f"{field}={kind}:{text}"


def facets_of(metadata: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in (facet_key(f, v) for f, v in metadata.items()) if k is not None)


def list_collections(location: QdrantLocation) -> list[str]:
    """The engine collections at `location` (those with both Qdrant collections and our metadata)."""
    client = POOL.acquire(location)
    try:
        try:
            names = {c.name for c in client.get_collections().collections}
        except Exception as exc:  # noqa: BLE001 - a server that is down or refuses the key
            raise ArtifactError(f"Qdrant store {location.describe()} cannot be read ({type(exc).__name__}: "
                                f"{exc})") from None
        out = []
        for qname in sorted(names):
            base = qname[: -len(_SUFFIX["images"])]
            if qname.endswith(_SUFFIX["images"]) and base + _SUFFIX["captions"] in names:
                meta = client.get_collection(qname).config.metadata or {}
                if meta.get("clipsearch_format") == STORE_FORMAT:
                    out.append(base)
        return out
    finally:
        POOL.release(location, client)


# -- the store -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Summary:
    seq: int
    counts: Mapping[str, int]
    metadata_fields: Mapping[str, list[Any]]


class QdrantStore(VectorStore):
    """One collection in Qdrant; `open` an existing one or `create` one. Qdrant compacts (optimises)
    its segments itself: `compacts` stays False."""

    def __init__(self, name: str, location: QdrantLocation, client: QdrantClient, readonly: bool = True,
                 params: IndexParams | None = None):
        self.name = name
        self.location = location
        self.client = client
        self.readonly = readonly
        self.names = qdrant_names(name)
        self._lock = threading.RLock()
        self._summary: _Summary | None = None
        self._closed = False
        state = self._read_state()
        if state is None:
            raise ArtifactError(f"collection {name!r} is not in the Qdrant store ({self._where()}); "
                                f"copy it there with `python -m offline migrate --collection {name} "
                                f"--to {self._spec()}`")
        self._meta, self._image_offsets = state
        meta = self._meta
        stored = IndexParams(**meta["params"]) if meta.get("params") else IndexParams()
        # the HNSW graph is built with the parameters the collection was created with; ef can change
        self.params = IndexParams("hnsw", stored.m, stored.ef_construction,
                                  (params or stored).ef_search)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def open(cls, location: QdrantLocation, name: str, readonly: bool = True,
             params: IndexParams | None = None) -> "QdrantStore":
        client = POOL.acquire(location)
        try:
            return cls(name, location, client, readonly, params)
        except ArtifactError:
            POOL.release(location, client)
            raise
        except Exception as exc:  # noqa: BLE001 - a server that is down or refuses the key
            POOL.release(location, client)
            raise ArtifactError(f"Qdrant store {location.describe()} cannot be read ({type(exc).__name__}: "
                                f"{exc})") from None

    @classmethod
    def create(cls, location: QdrantLocation, name: str, model: Mapping[str, Any], dim: int,
               params: IndexParams | None = None, hubness: Mapping[str, Any] | None = None,
               replace: bool = False, shard_number: int | None = None,
               replication_factor: int | None = None) -> "QdrantStore":
        """A new, empty collection (`replace`: drop an existing one of that name first). On a cluster,
        `shard_number` and `replication_factor` place both Qdrant collections (docs/scaling.md)."""
        params = params or IndexParams()
        placement = {k: v for k, v in (("shard_number", shard_number), ("replication_factor", replication_factor))
                     if v is not None}
        client = POOL.acquire(location)
        try:
            names = qdrant_names(name)
            exists = [client.collection_exists(q) for q in names.values()]
            if any(exists) and not replace:
                raise ArtifactError(f"collection {name!r} already exists in the Qdrant store")
            for qname, there in zip(names.values(), exists):
                if there:
                    client.delete_collection(qname)
            hnsw = models.HnswConfigDiff(m=params.m, ef_construct=params.ef_construction)
            meta = {"clipsearch_format": STORE_FORMAT, "model": dict(model), "dim": int(dim),
                    "hubness": dict(hubness) if hubness else None, "uid": uuid.uuid4().hex, "seq": 0,
                    "next_order": 0, "params": {"kind": "hnsw", "m": params.m,
                                                "ef_construction": params.ef_construction,
                                                "ef_search": params.ef_search}}
            client.create_collection(names["captions"], hnsw_config=hnsw, vectors_config=models.VectorParams(
                size=int(dim) + 1, distance=models.Distance.DOT), **placement)
            # the images collection last: its metadata marks the pair as complete
            client.create_collection(names["images"], hnsw_config=hnsw, metadata=meta, **placement,
                                     vectors_config=models.VectorParams(size=int(dim) + 1,
                                                                        distance=models.Distance.DOT))
            with warnings.catch_warnings():
                # local mode warns that payload indexes have no effect there; a server uses them
                warnings.simplefilter("ignore", UserWarning)
                for qname in names.values():
                    for fld in ("facets", "image_id"):
                        client.create_payload_index(qname, fld, models.PayloadSchemaType.KEYWORD, wait=True)
        except BaseException:
            POOL.release(location, client)
            raise
        try:
            return cls(name, location, client, readonly=False, params=params)
        except BaseException:
            POOL.release(location, client)
            raise

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                POOL.release(self.location, self.client)

    # -- contract ---------------------------------------------------------------------------
    @property
    def model(self) -> Mapping[str, Any]:
        return self._meta["model"]

    @property
    def dim(self) -> int:
        return int(self._meta["dim"])

    @property
    def writable(self) -> bool:
        return not self.readonly

    @property
    def hubness(self) -> Mapping[str, Any] | None:
        """How the caption offsets were made (image → caption searches), or None."""
        return self._meta.get("hubness")

    @property
    def hubness_images(self) -> Mapping[str, Any] | None:
        """How the image offsets were made (text → image searches), or None."""
        return self._meta.get("hubness_images")

    @property
    def image_offsets(self) -> bool:
        """Whether the images collection has the offset column (False: made before image offsets)."""
        return self._image_offsets

    @property
    def meta(self) -> Mapping[str, Any]:
        return dict(self._meta)

    @property
    def version(self) -> str:
        m = self._meta
        return sha256_json([self.name, m["uid"], m["seq"], m["model"]])[:16]

    def count(self, target: Target = "images") -> int:
        return int(self._current().counts[target])

    def ids(self) -> list[str]:
        rows = [(p.payload["order"], p.payload["image_id"])
                for p in self._scroll("images", ["image_id", "order"])]
        return [i for _, i in sorted(rows)]

    def get(self, image_id: str) -> Item | None:
        return self.get_many([image_id])[0]

    def get_many(self, image_ids: Sequence[str]) -> list[Item | None]:
        """One retrieve for the whole page."""
        if not image_ids:
            return []
        pts = self.client.retrieve(self.names["images"], [image_point_id(i) for i in image_ids], with_payload=True)
        found = {}
        for pt in pts:
            p = pt.payload or {}
            found[p["image_id"]] = Item(p["image_id"], p["path"], tuple(p.get("captions", ())),
                                        dict(p.get("metadata", {})))
        return [found.get(i) for i in image_ids]

    def vector(self, image_id: str) -> NDArray[np.float32] | None:
        pts = self.client.retrieve(self.names["images"], [image_point_id(image_id)], with_payload=False,
                                   with_vectors=True)
        return None if not pts else np.asarray(pts[0].vector, dtype=np.float32)[: self.dim]  # less the offset

    def add(self, items: Sequence[NewItem], caption_offsets: Sequence[NDArray[np.float32] | None] | None = None
            ) -> None:
        """Insert or replace items and all their captions, each image with its hubness offset
        (`NewItem.offset`). `caption_offsets`: per item, one hubness offset per caption; default each
        item's `caption_offsets` (zeros where it gives none)."""
        self._writable()
        items = list(items)
        offsets = list(caption_offsets) if caption_offsets is not None else [None] * len(items)
        if len(offsets) != len(items):
            raise StoreError(f"{len(offsets)} offset arrays for {len(items)} items")
        images, captions = [], []
        order = int(self._meta.get("next_order", 0))
        for item, off in zip(items, offsets):
            vec = self._check_vector(item.vector, f"item {item.image_id}")
            image_off = self._image_offset(item)
            cap_ids, cap_vecs, cap_off = self._captions_of(item, off)
            facets = facets_of(item.metadata)
            images.append(models.PointStruct(
                id=image_point_id(item.image_id),
                vector=[*vec.tolist(), image_off] if self._image_offsets else vec.tolist(), payload={
                    "image_id": item.image_id, "path": item.path, "captions": list(item.captions),
                    "caption_ids": list(cap_ids), "metadata": _jsonable(item.metadata, item.image_id),
                    "facets": facets, "order": order, "offset": image_off}))
            for i, (cid, text, v, o) in enumerate(zip(cap_ids, item.captions, cap_vecs, cap_off)):
                captions.append(self._caption_point(item.image_id, cid, text, i, v, float(o), facets, order))
            order += 1
        if not images:
            self._bump(order)  # as FaissStore: an (empty) write is a write
            return
        # an upsert replaces all of an item's captions: drop the old ones first (a new list may be shorter)
        self._delete_captions_of(self._existing([item.image_id for item in items]))
        self._upsert("captions", captions)
        self._upsert("images", images)
        self._bump(order)

    def delete(self, image_ids: Sequence[str]) -> int:
        self._writable()
        ids = list(dict.fromkeys(image_ids))
        if not ids:
            return 0
        existing = self._existing(ids)
        self._delete_captions_of(existing)
        for chunk in _chunks(list(existing), SCROLL_BATCH):
            self.client.delete(self.names["images"], models.PointIdsList(points=[image_point_id(i) for i in chunk]),
                               wait=True)
        self._bump()
        return len(existing)

    def replace_captions(self, image_id: str, captions: Sequence[str], vectors: NDArray[np.float32],
                         offsets: NDArray[np.float32] | None = None) -> None:
        self._writable()
        pts = self.client.retrieve(self.names["images"], [image_point_id(image_id)], with_payload=True)
        if not pts:
            raise StoreError(f"no item {image_id!r} in collection {self.name!r}")
        payload = pts[0].payload or {}
        vecs = np.asarray(vectors, dtype=np.float32)
        if vecs.size != len(captions) * self.dim:
            raise StoreError(f"{len(captions)} captions need ({len(captions)}, {self.dim}) vectors, "
                             f"got shape {vecs.shape}")
        item = NewItem(image_id, payload["path"], np.zeros(self.dim, np.float32), tuple(captions),
                       vecs.reshape(len(captions), self.dim), caption_offsets=offsets)
        cap_ids, cap_vecs, cap_off = self._captions_of(item, None)
        points = [self._caption_point(image_id, cid, text, i, v, float(o), payload.get("facets", []),
                                      payload["order"])
                  for i, (cid, text, v, o) in enumerate(zip(cap_ids, captions, cap_vecs, cap_off))]
        self._delete_captions_of({image_id: list(payload.get("caption_ids", ()))})
        self._upsert("captions", points)
        self.client.set_payload(self.names["images"], {"captions": list(captions), "caption_ids": list(cap_ids)},
                                points=[image_point_id(image_id)], wait=True)
        self._bump()

    def refresh(self) -> bool:
        state = self._read_state()
        if state is None or state[0] == self._meta:
            return False
        with self._lock:
            self._meta, self._image_offsets = state  # made afresh (migrate) it may have another layout
            self._summary = None
        return True

    def set_hubness(self, hubness: Mapping[str, Any] | None) -> None:
        """Record the correction the caption offsets were made with (as the catalog's `hubness`)."""
        self._writable()
        self._bump(hubness=dict(hubness) if hubness else None)

    def set_hubness_images(self, hubness_images: Mapping[str, Any] | None) -> None:
        """Record the correction the image offsets were made with (as the catalog's `hubness_images`)."""
        self._writable()
        self._bump(hubness_images=dict(hubness_images) if hubness_images else None)

    def set_source(self, source: Mapping[str, Any]) -> None:
        """Record what the contents were copied from (`offline migrate`: the catalog's uid and seq)."""
        self._writable()
        self._bump(source=dict(source))

    def describe(self) -> dict[str, Any]:
        s = self._current()
        kind = "exact" if self.location.local else "hnsw"  # local mode searches by brute force
        return {"name": self.name, "images": s.counts["images"], "captions": s.counts["captions"],
                "model": dict(self.model), "index": {"images": kind, "captions": kind}, "version": self.version,
                "hubness": self.hubness, "hubness_images": self.hubness_images,
                "metadata_fields": {k: list(v) for k, v in s.metadata_fields.items()}}

    def search(self, query: NDArray[np.float32], k: int, *, target: Target = "images",
               filter: Filter | None = None, offset: int = 0, min_score: float | None = None,
               exclude: Sequence[str] = (), hubness: bool = True) -> list[Hit]:
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise StoreError(f"query vector has dimension {q.shape[0]}, collection {self.name!r} holds "
                             f"{self.dim}")
        if target not in _SUFFIX:
            raise StoreError(f"target must be 'images' or 'captions', not {target!r}")
        must: list[models.Condition] = []
        if filter:
            try:
                keys = filter_keys(filter)
            except ValueError as exc:
                raise StoreError(str(exc)) from None
            for name, accepted in keys.items():
                wanted = [f"{name}={kind}:{json.dumps(v) if kind != 's' else v}" for kind, v in sorted(accepted)]
                must.append(models.FieldCondition(key="facets", match=models.MatchAny(any=wanted)))
        must_not: list[models.Condition] = []
        if exclude:
            must_not.append(models.FieldCondition(key="image_id", match=models.MatchAny(any=list(exclude))))
        flt = models.Filter(must=must or None, must_not=must_not or None) if (must or must_not) else None
        if int(k) <= 0:
            return []
        # the offset column counts with hubness, not without (an older images collection has none)
        with_offsets = target == "captions" or self._image_offsets
        vec = np.append(q, np.float32(1.0 if hubness else 0.0)) if with_offsets else q
        offsets_count = hubness and with_offsets
        limit = int(k)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # local mode: "search_params has no effect"
            res = self.client.query_points(
                self.names[target], query=vec.tolist(), limit=limit, offset=max(0, int(offset)),
                query_filter=flt, with_payload=["image_id", "caption_id", "caption", "offset"],
                search_params=models.SearchParams(hnsw_ef=max(self.params.ef_search, limit + int(offset))))
        hits = []
        for p in res.points:
            score = float(p.score)
            if min_score is not None and score < min_score:
                break  # ranked by score: the rest are lower still (filtered here: local mode drops ties)
            pl = p.payload or {}
            cosine = score - float(pl.get("offset", 0.0)) if offsets_count else score
            if target == "images":
                hits.append(Hit(pl["image_id"], score, cosine))
            else:
                hits.append(Hit(pl["image_id"], score, cosine, pl["caption_id"], pl["caption"]))
        return hits

    # -- internals ----------------------------------------------------------------------------
    def _where(self) -> str:
        return self.location.describe()

    def _spec(self) -> str:
        return self.location.url or f"qdrant:{self.location.path}"

    def _writable(self) -> None:
        if self.readonly:
            raise ArtifactError(f"collection {self.name!r} is open read-only")

    def _read_state(self) -> tuple[dict[str, Any], bool] | None:
        """(the collection's metadata, whether its images have the offset column), or None when the
        pair is not there or not ours."""
        try:
            if not (self.client.collection_exists(self.names["images"])
                    and self.client.collection_exists(self.names["captions"])):
                return None
            config = self.client.get_collection(self.names["images"]).config
        except ValueError:
            return None
        meta = config.metadata
        if not meta or meta.get("clipsearch_format") != STORE_FORMAT:
            return None
        size = getattr(config.params.vectors, "size", None)
        return dict(meta), size is not None and int(size) == int(meta["dim"]) + 1

    def _image_offset(self, item: NewItem) -> float:
        off = float(item.offset)
        if not np.isfinite(off):
            raise StoreError(f"item {item.image_id}: the image offset must be finite")
        if off and not self._image_offsets:
            raise StoreError(f"collection {self.name!r} in the Qdrant store was made before image hubness "
                             f"offsets and has no room for them; re-migrate it with `python -m offline migrate "
                             f"--collection {self.name} --to {self._spec()}`")
        return off

    def _bump(self, next_order: int | None = None, **changes: Any) -> None:
        """Every write moves the sequence number (and so `version`) and is recorded with the collection."""
        with self._lock:
            seq = int(self._meta.get("seq", 0)) + 1
            update = {"seq": seq, "write": uuid.uuid4().hex, **changes}
            if next_order is not None:
                update["next_order"] = next_order
            self.client.update_collection(self.names["images"], metadata=update)
            self._meta = {**self._meta, **update}
            self._summary = None

    def _current(self) -> _Summary:
        s = self._summary
        seq = int(self._meta.get("seq", 0))
        if s is not None and s.seq == seq:
            return s
        with self._lock:
            counts = {t: int(self.client.count(q, exact=True).count) for t, q in self.names.items()}
            s = _Summary(seq, counts, _metadata_fields(self._scroll("images", ["metadata", "order"])))
            self._summary = s
            return s

    def _scroll(self, target: str, fields: list[str]) -> Iterator[models.Record]:
        next_offset = None
        while True:
            pts, next_offset = self.client.scroll(self.names[target], limit=SCROLL_BATCH, offset=next_offset,
                                                  with_payload=fields, with_vectors=False)
            yield from pts
            if next_offset is None:
                break

    def _check_vector(self, vector: Any, what: str) -> NDArray[np.float32]:
        v = np.asarray(vector, dtype=np.float32).reshape(-1)
        if v.shape[0] != self.dim:
            raise StoreError(f"{what}: vector of dimension {v.shape[0]}, the collection's model embeds to "
                             f"{self.dim}")
        if not np.all(np.isfinite(v)):
            raise StoreError(f"{what}: vector has NaN or infinite values")
        return v

    def _captions_of(self, item: NewItem, offsets: NDArray[np.float32] | None
                     ) -> tuple[tuple[str, ...], list[NDArray[np.float32]], NDArray[np.float32]]:
        n = len(item.captions)
        if not n:
            return (), [], np.zeros(0, np.float32)
        vecs = item.caption_vectors
        if vecs is None or len(vecs) != n:
            raise StoreError(f"item {item.image_id}: {n} captions need as many vectors")
        ids = item.caption_ids or tuple(f"{item.image_id}#{i}" for i in range(n))
        if len(ids) != n:
            raise StoreError(f"item {item.image_id}: {n} captions need as many caption ids")
        if offsets is None:
            offsets = item.caption_offsets
        off = np.zeros(n, np.float32) if offsets is None else np.asarray(offsets, np.float32).reshape(-1)
        if off.shape[0] != n or not np.all(np.isfinite(off)):
            raise StoreError(f"item {item.image_id}: {n} captions need as many finite offsets")
        return tuple(ids), [self._check_vector(v, f"caption {c}") for c, v in zip(ids, vecs)], off

    @staticmethod
    def _caption_point(image_id: str, caption_id: str, text: str, ord_: int, vector: NDArray[np.float32],
                       offset: float, facets: list[str], order: int) -> models.PointStruct:
        return models.PointStruct(
            id=caption_point_id(caption_id), vector=[*vector.tolist(), offset],
            payload={"image_id": image_id, "caption_id": caption_id, "caption": text, "ord": ord_,
                     "offset": offset, "facets": facets, "order": order})

    def _upsert(self, target: str, points: list[models.PointStruct]) -> None:
        for chunk in _chunks(points, UPSERT_BATCH):
            self.client.upsert(self.names[target], points=list(chunk), wait=True)

    def _existing(self, image_ids: Sequence[str]) -> dict[str, list[str]]:
        """The items among `image_ids` the collection holds, with their caption ids."""
        out: dict[str, list[str]] = {}
        for chunk in _chunks(list(dict.fromkeys(image_ids)), SCROLL_BATCH):
            for p in self.client.retrieve(self.names["images"], [image_point_id(i) for i in chunk],
                                          with_payload=["image_id", "caption_ids"]):
                out[p.payload["image_id"]] = list(p.payload.get("caption_ids", ()))
        return out

    def _delete_captions_of(self, caption_ids_by_image: Mapping[str, Sequence[str]]) -> None:
        """Delete those items' captions by point id (cheap on a server and in local mode, unlike a
        filtered delete, which local mode answers by scanning every point)."""
        ids = [caption_point_id(c) for cids in caption_ids_by_image.values() for c in cids]
        for chunk in _chunks(ids, SCROLL_BATCH):
            self.client.delete(self.names["captions"], models.PointIdsList(points=list(chunk)), wait=True)


def _chunks(seq: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def _jsonable(metadata: Mapping[str, Any], image_id: str) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(dict(metadata), ensure_ascii=False, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"item {image_id}: metadata must be JSON ({exc})") from None


def _metadata_fields(records: Iterator[models.Record]) -> dict[str, list[Any]]:
    """Fields with at most FACET_MAX_VALUES distinct filterable values, and those values (the first
    one seen of each value key, in insertion order, sorted as FaissStore sorts them)."""
    rows = sorted((((r.payload or {}).get("order", 0), (r.payload or {}).get("metadata", {})) for r in records),
                  key=lambda row: row[0])
    originals: dict[str, dict[tuple[str, Any], Any]] = {}
    for _, meta in rows:
        for name, value in meta.items():
            key = value_key(value)
            if key is not None:
                originals.setdefault(name, {}).setdefault(key, value)
    return {name: sorted(by.values(), key=lambda v: (str(type(v)), v))
            for name, by in sorted(originals.items()) if len(by) <= FACET_MAX_VALUES}
