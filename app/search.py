"""Search jobs without HTTP: what one search asks of a collection, and its hits as plain values.

The engine (`app.engine`) runs these on the inference pool (decode, encode, search) and caches what
they return; routes map the plain results (`ImageResult`, `CaptionResult`) to response models.
`SearchSpec.cache_key` says everything that changes an answer. Errors are the service's domain
errors (`app.errors`), never HTTP.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipsearch.images import ImageDecodeError, decode_image
from clipsearch.store import Hit, StoreError, VectorStore

from app.errors import InvalidSearch, NotFound
from app.inputs import InputError, combine_terms
from app.resources import Resources, UnknownCollection


@dataclass(frozen=True)
class Options:
    """What every search asks besides its query: the collection (None: the default one), how many
    results from which rank, the lowest score, the metadata filter and what to return."""

    collection: str | None
    k: int
    offset: int = 0
    min_score: float | None = None
    filter: Mapping[str, Any] | None = None
    target: str = "images"


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


@dataclass(frozen=True)
class ImageResult:
    image_id: str
    score: float
    rank: int
    captions: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CaptionResult:
    caption_id: str
    caption: str
    image_id: str
    score: float
    cosine: float
    rank: int


Results = tuple[ImageResult, ...] | tuple[CaptionResult, ...]


def resolve(res: Resources, name: str | None) -> VectorStore:
    try:
        return res.store(name)
    except UnknownCollection:
        raise NotFound("unknown collection") from None


def spec_for(res: Resources, options: Options) -> tuple[VectorStore, SearchSpec]:
    """The store and the spec of a search's options."""
    store = resolve(res, options.collection)
    flt = dict(options.filter) if options.filter is not None else None
    return store, SearchSpec(store.name, options.k, options.offset, options.min_score, flt, options.target)


def results(store: VectorStore, spec: SearchSpec, hits: Sequence[Hit]) -> Results:
    """The hits as results, ranked across pages; the items of a page of images read in one call."""
    ranks = range(spec.offset + 1, spec.offset + 1 + len(hits))
    if spec.target == "captions":
        return tuple(CaptionResult(hit.caption_id or "", hit.caption or "", hit.image_id, hit.score, hit.cosine, rank)
                     for hit, rank in zip(hits, ranks))
    items = store.get_many([hit.image_id for hit in hits])
    return tuple(ImageResult(hit.image_id, hit.score, rank, tuple(item.captions) if item else (),
                             dict(item.metadata) if item else {})
                 for hit, rank, item in zip(hits, ranks, items))


def hubness_applies(query: str, target: str) -> bool:
    """Whether a query ranks by the target's hubness-corrected score (`clipsearch.hubness`): the
    corrections are made with banks of the *other* modality's queries, so they apply to text → image
    and image → caption; image → image and text → caption rank by the plain cosine. A raw vector
    (/search/vector) is taken as the target's usual query and keeps the correction."""
    return {"text": target == "images", "image": target == "captions"}.get(query, True)


def search_vector(store: VectorStore, spec: SearchSpec, vec: np.ndarray, exclude: Sequence[str] = (),
                  query: str = "text") -> Results:
    """The results of one query vector (`query`: "text", "image" or "vector", what it was made from)."""
    try:
        hits = store.search(vec, spec.k, target=spec.target, filter=spec.filter,  # type: ignore[arg-type]
                            offset=spec.offset, min_score=spec.min_score, exclude=exclude,
                            hubness=hubness_applies(query, spec.target))
    except StoreError as exc:
        raise InvalidSearch(str(exc)) from None
    return results(store, spec, hits)


def similar_job(store: VectorStore, spec: SearchSpec, image_id: str) -> tuple[Results, dict[str, float]]:
    t0 = time.perf_counter()
    vec = store.vector(image_id)
    if vec is None:
        raise NotFound("unknown image id")
    hits = search_vector(store, spec, vec, exclude=(image_id,), query="image")
    return hits, {"search": time.perf_counter() - t0}


def vector_job(store: VectorStore, spec: SearchSpec, vec: np.ndarray) -> tuple[Results, dict[str, float]]:
    t0 = time.perf_counter()
    hits = search_vector(store, spec, vec, query="vector")
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
              tta: bool = False) -> tuple[Results, dict[str, float]]:
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
    hits = search_vector(store, spec, query, exclude=exclude, query=kind)
    return hits, {"decode": t1 - t0, "encode": t2 - t1, "search": time.perf_counter() - t2}
