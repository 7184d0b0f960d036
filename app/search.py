"""HTTP-free search jobs: what one search asks of a collection, and its hits as response models.

The routes validate and cache; these functions run on the inference pool (decode, encode, search)
and never see a request. `SearchSpec.cache_key` says everything that changes an answer.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import numpy as np

from clipsearch.images import ImageDecodeError, decode_image
from clipsearch.store import Hit, StoreError, VectorStore

from app.batching import ImageQuery
from app.errors import InvalidSearch, NotFound
from app.inputs import InputError, combine_terms
from app.resources import Resources, UnknownCollection
from app.schemas import CaptionHit, ImageHit


@dataclass(frozen=True)
class SearchSpec:
    collection: str  # resolved name
    k: int
    offset: int = 0
    min_score: float | None = None
    filter: dict[str, Any] | None = None
    target: str = "images"

    def cache_key(self, kind: str, query: Hashable, version: str) -> tuple[Hashable, ...]:
        flt = json.dumps(self.filter, sort_keys=True) if self.filter else None
        return (kind, query, self.collection, self.target, self.k, self.offset, self.min_score, flt, version)


def resolve(res: Resources, name: str | None) -> VectorStore:
    try:
        return res.store(name)
    except UnknownCollection:
        raise NotFound("unknown collection") from None


def spec_for(res: Resources, body: Any, target: str = "images") -> tuple[VectorStore, SearchSpec]:
    """The store and spec of a validated request body (text, similar) or form (image)."""
    store = resolve(res, body.collection)
    return store, SearchSpec(store.name, body.k, body.offset, body.min_score, body.filter, target)


def image_url(res: Resources, collection: str, image_id: str, kind: str = "images") -> str:
    url = f"/{kind}/{quote(image_id, safe='')}"
    return url if collection == res.default_collection else f"{url}?collection={quote(collection, safe='')}"


def to_models(res: Resources, store: VectorStore, spec: SearchSpec, hits: Sequence[Hit]
              ) -> tuple[ImageHit, ...] | tuple[CaptionHit, ...]:
    out: list[Any] = []
    for rank, hit in enumerate(hits, spec.offset + 1):
        urls = {"image_url": image_url(res, store.name, hit.image_id),
                "thumbnail_url": image_url(res, store.name, hit.image_id, "thumbnails")}
        if spec.target == "captions":
            out.append(CaptionHit(caption_id=hit.caption_id or "", caption=hit.caption or "",
                                  image_id=hit.image_id, score=hit.score, cosine=hit.cosine, rank=rank, **urls))
        else:
            item = store.get(hit.image_id)
            out.append(ImageHit(image_id=hit.image_id, score=hit.score, rank=rank,
                                captions=list(item.captions) if item else [],
                                metadata=dict(item.metadata) if item else {}, **urls))
    return tuple(out)


def hubness_applies(query: str, target: str) -> bool:
    """Whether a query ranks by the target's hubness-corrected score (`clipsearch.hubness`): the
    corrections are made with banks of the *other* modality's queries, so they apply to text → image
    and image → caption; image → image and text → caption rank by the plain cosine. A raw vector
    (/search/vector) is taken as the target's usual query and keeps the correction."""
    return {"text": target == "images", "image": target == "captions"}.get(query, True)


def search_vector(res: Resources, store: VectorStore, spec: SearchSpec, vec: np.ndarray,
                  exclude: Sequence[str] = (), query: str = "text") -> tuple[Any, ...]:
    """The hits of one query vector (`query`: "text", "image" or "vector", what it was made from), as
    response models."""
    try:
        hits = store.search(vec, spec.k, target=spec.target, filter=spec.filter,  # type: ignore[arg-type]
                            offset=spec.offset, min_score=spec.min_score, exclude=exclude,
                            hubness=hubness_applies(query, spec.target))
    except StoreError as exc:
        raise InvalidSearch(str(exc)) from None
    return to_models(res, store, spec, hits)


async def image_search(state: Any, res: Resources, store: VectorStore, spec: SearchSpec, data: bytes,
                       max_pixels: int) -> tuple[tuple[Any, ...], dict[str, float]]:
    """An image query through the service's image micro-batcher (`ServiceState.image_batcher`): the
    upload is decoded on the pool, encoded with whatever other image queries wait, then searched; the hits
    and its batch's stage timings (decode, encode, search)."""
    query = ImageQuery(data, max_pixels, tta=state.settings.query_image_tta)
    hits, stages = await state.image_batcher.upload(res, query,
                                                    lambda vec: search_vector(res, store, spec, vec, query="image"))
    return hits, {s: v for s, v in stages.items() if s != "batch_size"}


def similar_job(res: Resources, store: VectorStore, spec: SearchSpec, image_id: str
                ) -> tuple[tuple[Any, ...], dict[str, float]]:
    t0 = time.perf_counter()
    vec = store.vector(image_id)
    if vec is None:
        raise NotFound("unknown image id")
    hits = search_vector(res, store, spec, vec, exclude=(image_id,), query="image")
    return hits, {"search": time.perf_counter() - t0}


def vector_job(res: Resources, store: VectorStore, spec: SearchSpec, vec: np.ndarray
               ) -> tuple[tuple[Any, ...], dict[str, float]]:
    t0 = time.perf_counter()
    hits = search_vector(res, store, spec, vec, query="vector")
    return hits, {"search": time.perf_counter() - t0}


@dataclass(frozen=True)
class Term:
    """One validated term of a weighted query: `kind` is text, image_id or image (`value` the
    normalised text, the item id, or the image bytes)."""

    kind: str
    value: Any
    weight: float

    def cache_part(self) -> tuple[str, str, float]:
        value = hashlib.sha256(self.value).hexdigest() if self.kind == "image" else self.value
        return (self.kind, value, self.weight)


def terms_job(res: Resources, store: VectorStore, spec: SearchSpec, terms: Sequence[Term], max_pixels: int,
              tta: bool = False) -> tuple[tuple[Any, ...], dict[str, float]]:
    """Encode every term (texts in one batch, images in one batch, item vectors from the store),
    search with their normalised weighted sum; items named by `image_id` are left out of the hits."""
    t0 = time.perf_counter()
    vectors: list[np.ndarray | None] = [None] * len(terms)
    for i, term in enumerate(terms):
        if term.kind == "image_id":
            vectors[i] = store.vector(term.value)
            if vectors[i] is None:
                raise InputError("invalid_request", f"terms[{i}].image_id: no such item in collection "
                                                    f"{store.name!r}")
    images = []
    try:
        for i, term in enumerate(terms):
            if term.kind == "image":
                try:
                    images.append((i, decode_image(term.value, max_pixels=max_pixels)))
                except ImageDecodeError as exc:
                    raise ImageDecodeError(f"terms[{i}].image: {exc}") from None
        t1 = time.perf_counter()
        if images:
            for (i, _), vec in zip(images, res.encoder.encode_images([im for _, im in images], tta=tta)):
                vectors[i] = vec
    finally:
        for _, im in images:
            im.close()
    texts = [(i, t.value) for i, t in enumerate(terms) if t.kind == "text"]
    if texts:
        for (i, _), vec in zip(texts, res.encoder.encode_texts([t for _, t in texts])):
            vectors[i] = vec
    t2 = time.perf_counter()
    query = combine_terms([v for v in vectors if v is not None], [t.weight for t in terms])
    exclude = tuple(t.value for t in terms if t.kind == "image_id")
    # a query with any text in it is searched as a text query, else as an image query
    kind = "text" if any(t.kind == "text" for t in terms) else "image"
    hits = search_vector(res, store, spec, query, exclude=exclude, query=kind)
    return hits, {"decode": t1 - t0, "encode": t2 - t1, "search": time.perf_counter() - t2}
