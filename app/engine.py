"""The engine: everything the service does, without HTTP (the shape of infinity's `engine.py`).

`Engine` owns what start-up loads (`Resources`, swapped in one reference on a reload), the bounded
inference pool, both micro-batchers (`app.batching`: the batching stays inside), the answer cache,
the thumbnails, the image_url fetcher, the metrics and the write half (`app.writes.Writer`: write
admission, the writer thread, the hubness banks' offsets through `Collection`, the compaction
policy). Its methods take plain values (a query, `Options`, bytes) and return plain values (`Page`
of `ImageResult`/`CaptionResult`, `Embeddings`, `WriteResult`), raising the service's domain errors
(`app.errors.ApiError`); routes map those to response models and HTTP in one place each. A request
reads as one line: route → engine → collection (`clipsearch.collection`) → store.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from clipsearch.artifacts import ArtifactLayout
from clipsearch.images import ImageDecodeError
from clipsearch.store import Item, VectorStore
from clipsearch.watch_status import read_watch_status

from app.batching import ImageBatcher, ImageQuery, TextBatcher, image_slots
from app.cache import ResponseCache
from app.config import Settings, cpu_cores
from app.errors import NotFound, NotReady
from app.fetch import FetchSettings, UrlFetcher
from app.inputs import MAX_TERMS, InputError, check_weights, decode_base64_image, validate_vector
from app.limits import InFlightLimiter
from app.metrics import Metrics
from app.resources import Resources
from app.search import Options, Results, SearchSpec, Term, resolve, similar_job, spec_for, terms_job, vector_job
from app.search import search_vector as vector_results
from app.thumbnails import Thumbnail, ThumbnailCache
from app.writes import WriteResult, Writer

T = TypeVar("T")


@dataclass(frozen=True)
class ImageSource:
    """An image given in a JSON body: base64 (or a data: URI), or a URL to fetch."""

    base64: str | None = None
    url: str | None = None


# An image to search with or embed: its bytes, a JSON body's base64 or URL, or an upload to read (only
# once the search's cheap checks passed: the service is ready, the collection served).
ImageInput = bytes | ImageSource | Callable[[], Awaitable[bytes]]


@dataclass(frozen=True)
class TermInput:
    """One term of a weighted query as asked: exactly one of text, image_id, image (base64)."""

    weight: float
    text: str | None = None
    image_id: str | None = None
    image: str | None = None


@dataclass(frozen=True)
class Page:
    """One page of a search's results. `stages`: seconds per stage of the work done for it, None when
    it came from the cache; `default_collection`: the served default (links name the others);
    `memo`: kept with the cache entry, for what a caller derives from these results (the routes keep
    their JSON there, so a cache hit costs no response models)."""

    results: Results
    spec: SearchSpec
    stages: Mapping[str, float] | None
    default_collection: str
    memo: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray  # (n, dim)
    model: Mapping[str, Any]
    stages: Mapping[str, float]


class Engine:
    def __init__(self, settings: Settings, resources: Resources | None = None):
        self.settings = settings
        self.metrics = Metrics()
        self.cache = ResponseCache(settings.cache_size)
        self.thumbnails = ThumbnailCache(settings.thumbnail_cache_size, settings.thumbnail_px,
                                         settings.max_image_pixels)
        self.limiter = InFlightLimiter(settings.max_in_flight)  # searches (AdmissionMiddleware)
        self.fetcher = UrlFetcher(FetchSettings.from_settings(settings))  # image_url queries (off by default)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        # concurrent text queries share forward passes; one batch in flight per inference thread
        self.batcher = TextBatcher(self.run, slots=settings.inference_threads, max_batch=settings.text_batch_size)
        # concurrent image queries (and writes' images) share forward passes too; the image session
        # runs on `image_threads` cores, so `set_ready` sets how many batches run at once
        self.image_batcher = ImageBatcher(self.run, slots=settings.inference_threads,
                                          max_batch=settings.image_batch_size)
        self.writes = (Writer(settings, self.metrics, self.image_batcher, self.run)
                       if settings.writes_enabled else None)
        self.resources: Resources | None = None
        self.reason = "loading the model and the collections"
        self.reload_error: str | None = None  # why the last reload failed while old resources served
        self._loading = False
        self._loading_lock = threading.Lock()
        self.metrics.store_source = lambda: self.resources
        if resources is not None:
            self.set_ready(resources)

    # -- lifecycle ----------------------------------------------------------------------------------
    def begin_loading(self) -> bool:
        """Claim the one loader slot; False while a load or reload is already running."""
        with self._loading_lock:
            if self._loading:
                return False
            self._loading = True
            return True

    def end_loading(self) -> None:
        with self._loading_lock:
            self._loading = False

    @property
    def loading(self) -> bool:
        return self._loading

    def set_ready(self, resources: Resources) -> None:
        # One reference swap: a request that already holds the old resources finishes on them, the
        # next one sees the new set. Cache keys carry the index version, so clearing only frees memory.
        self.metrics.set_served(resources.image_count, resources.caption_count,
                                dict(resources.model), resources.version, resources.default_collection)
        # The error and reason are cleared before the swap: /readyz (on the event loop) may run between
        # any two of these lines, and must never pair the new index version with the old error.
        self.reload_error = None
        self.reason = ""
        self.image_batcher.slots = image_slots(resources.encoder, self.settings.inference_threads, cpu_cores())
        self.resources = resources
        self.cache.clear()
        self.thumbnails.clear()

    def set_reload_failed(self, reason: str) -> None:
        """A reload failed while resources were being served: keep serving them, remember why."""
        self.reload_error = reason

    def set_failed(self, reason: str) -> None:
        self.resources = None
        self.reason = reason
        self.metrics.ready.set(0)

    def require_ready(self) -> Resources:
        res = self.resources
        if res is None:
            raise NotReady(self.reason, headers={"Retry-After": str(max(self.settings.retry_after_s, 1))})
        return res

    @property
    def pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.settings.inference_threads,
                                                thread_name_prefix="clipsearch-inference")
            return self._pool

    def close_pool(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        if self.writes is not None:
            self.writes.close()
        self.close_pool()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking work (decode, encode, search) on the bounded inference pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(fn, *args))

    # -- searches -----------------------------------------------------------------------------------
    async def _answer(self, endpoint: str, key: Hashable, res: Resources, spec: SearchSpec,
                      compute: Callable[[], Awaitable[tuple[Results, dict[str, float]]]]) -> Page:
        """The cached results for `key`, or `await compute()` (work on the inference pool), cached."""
        cached = self.cache.get(key)
        if cached is not None:
            self.metrics.cache_hits.labels(endpoint).inc()
            results, memo = cached
            return Page(results, spec, None, res.default_collection, memo)
        self.metrics.cache_misses.labels(endpoint).inc()
        results, stages = await compute()
        self.metrics.observe_stages(endpoint, stages)
        memo: dict[str, Any] = {}
        self.cache.put(key, (results, memo))
        self.metrics.cache_entries.set(len(self.cache))
        return Page(results, spec, stages, res.default_collection, memo)

    async def search_text(self, query: str, options: Options) -> Page:
        """Images (or captions) matching `query`, already normalised (`app.cache.normalize_query`)."""
        res = self.require_ready()
        store, spec = spec_for(res, options)

        async def compute() -> tuple[Results, dict[str, float]]:
            hits, stages = await self.batcher.search(res, query, lambda vec: vector_results(store, spec, vec))
            return hits, {s: v for s, v in stages.items() if s != "batch_size"}

        return await self._answer("text", spec.cache_key("text", query, res.version), res, spec, compute)

    async def search_image(self, image: ImageInput, options: Options) -> Page:
        """Similar images or matching captions of an image (its bytes, or base64 / a URL); the same
        bytes share one cache entry however they came."""
        res = self.require_ready()
        store, spec = spec_for(res, options)
        data, fetch_s = await self.image_bytes(image)
        key = spec.cache_key("image", hashlib.sha256(data).hexdigest(), res.version)
        query = ImageQuery(data, self.settings.max_image_pixels, tta=self.settings.query_image_tta)

        async def compute() -> tuple[Results, dict[str, float]]:
            hits, stages = await self.image_batcher.upload(
                res, query, lambda vec: vector_results(store, spec, vec, query="image"))
            stages = {s: v for s, v in stages.items() if s != "batch_size"}
            return hits, stages if fetch_s is None else {"fetch": fetch_s, **stages}

        return await self._answer("image", key, res, spec, compute)

    async def search_similar(self, image_id: str, options: Options) -> Page:
        res = self.require_ready()
        store, spec = spec_for(res, options)
        return await self._answer("similar", spec.cache_key("similar", image_id, res.version), res, spec,
                                  lambda: self.run(similar_job, store, spec, image_id))

    async def search_vector(self, vector: Sequence[float], options: Options) -> Page:
        res = self.require_ready()
        store, spec = spec_for(res, options)
        vec = validate_vector(vector, store.dim)
        key = spec.cache_key("vector", hashlib.sha256(vec.tobytes()).hexdigest(), res.version)
        return await self._answer("vector", key, res, spec, lambda: self.run(vector_job, store, spec, vec))

    async def search_terms(self, terms: Sequence[TermInput], options: Options) -> Page:
        """A weighted sum of texts, items of the collection and images (a negative weight steers away)."""
        res = self.require_ready()
        store, spec = spec_for(res, options)
        check_weights([t.weight for t in terms], MAX_TERMS)  # before any encoding
        cap, image_bytes_total = self.settings.max_upload_bytes, 0  # the cap holds for all images together
        parsed = []
        for t in terms:
            if t.image is not None:
                data = decode_base64_image(t.image, cap)
                image_bytes_total += len(data)
                if image_bytes_total > cap:
                    raise InputError("payload_too_large", f"the images of one query together are larger "
                                                          f"than the {cap:,}-byte limit")
                parsed.append(Term("image", data, t.weight))
            elif t.image_id is not None:
                parsed.append(Term("image_id", t.image_id, t.weight))
            else:
                parsed.append(Term("text", t.text, t.weight))
        key = spec.cache_key("terms", tuple(t.cache_part() for t in parsed), res.version)
        return await self._answer("terms", key, res, spec,
                                  lambda: self.run(terms_job, res, store, spec, parsed,
                                                   self.settings.max_image_pixels, self.settings.query_image_tta))

    async def image_bytes(self, image: ImageInput) -> tuple[bytes, float | None]:
        """The bytes of an image under the upload cap, and the fetch's seconds when it came from a URL."""
        if isinstance(image, bytes):
            return image, None
        if callable(image):
            return await image(), None
        cap = self.settings.max_upload_bytes
        if image.base64 is not None:
            return decode_base64_image(image.base64, cap), None
        t0 = time.perf_counter()
        data = await self.fetcher.fetch(image.url)
        if not data:
            raise ImageDecodeError("the image URL answered an empty body")
        return data, time.perf_counter() - t0

    # -- embeddings ---------------------------------------------------------------------------------
    async def embed_texts(self, texts: Sequence[str]) -> Embeddings:
        res = self.require_ready()
        vecs, stages = await self.run(_encode_texts, res, list(texts), self.settings.text_batch_size)
        self.metrics.observe_stages("embed_text", stages)
        return Embeddings(vecs, res.model, stages)

    async def embed_image(self, image: ImageInput) -> Embeddings:
        """One image's vector as a collection stores it (with the model's image_tta), through the image
        micro-batcher (decoded with every check /search/image makes, beside image queries and uploads)."""
        res = self.require_ready()
        data, fetch_s = await self.image_bytes(image)
        vec, batch = await self.image_batcher.upload(res, ImageQuery(data, self.settings.max_image_pixels, tta=True),
                                                     lambda v: np.asarray(v))
        stages = {"decode": batch["decode"], "encode": batch["encode"]}
        if fetch_s is not None:
            stages = {"fetch": fetch_s, **stages}
        self.metrics.observe_stages("embed_image", stages)
        return Embeddings(vec[None, :], res.model, stages)

    # -- collections and media ----------------------------------------------------------------------
    def collection(self, name: str | None) -> VectorStore:
        """A served collection (None: the default one)."""
        return resolve(self.require_ready(), name)

    def item(self, name: str, image_id: str) -> tuple[str, Item]:
        """One item of a collection, with the collection's name."""
        store = self.collection(name)
        item = store.get(image_id)
        if item is None:
            raise NotFound("unknown image id")
        return store.name, item

    def watch_status(self, name: str) -> dict | None:
        """What the folder watcher of collection `name` last wrote (None when none runs: offline/watch.py)."""
        return read_watch_status(ArtifactLayout(self.settings.artifacts_dir).collection(name).watch_status)

    def media_file(self, name: str | None, image_id: str) -> tuple[str, Path]:
        """The image file of an item, with its collection's name."""
        res = self.require_ready()
        store = resolve(res, name)
        path = res.image_file(store, image_id)
        if path is None:
            raise NotFound("unknown image id")
        if not path.is_file():
            raise NotFound("image file not available on this server")
        return store.name, path

    async def thumbnail(self, name: str | None, image_id: str) -> Thumbnail:
        """A small JPEG of an item (an ImageDecodeError where the stored file is no image)."""
        collection, path = self.media_file(name, image_id)
        try:
            return await self.run(self.thumbnails.get, collection, image_id, path)
        except OSError:
            raise NotFound("image file not available on this server") from None

    # -- writes -------------------------------------------------------------------------------------
    def _writer(self) -> Writer:
        if self.writes is None:  # the write routes are not mounted then; a caller without HTTP asked
            raise NotFound("writes are not enabled on this service")
        return self.writes

    async def upload(self, name: str, read: Callable[[], Awaitable[bytes]], captions: Sequence[str] | None,
                     metadata: str | None, image_id: str | None) -> tuple[str, WriteResult]:
        """Add an image (the bytes `read()` gives once the cheap checks passed) with captions and
        metadata (a JSON object's text) to a collection; the same bytes again give the one item."""
        res = self.require_ready()
        store = resolve(res, name)
        return store.name, await self._writer().upload(res, store, read, captions, metadata, image_id)

    async def delete(self, name: str, image_id: str) -> None:
        res = self.require_ready()
        await self._writer().delete(resolve(res, name), image_id)

    async def replace_captions(self, name: str, image_id: str, captions: Sequence[str]) -> tuple[str, WriteResult]:
        res = self.require_ready()
        store = resolve(res, name)
        return store.name, await self._writer().replace_captions(res, store, image_id, captions)

    async def compact(self, name: str) -> tuple[str, dict[str, Any]]:
        store = resolve(self.require_ready(), name)
        return store.name, await asyncio.to_thread(self._writer().compact_now, store)


def _encode_texts(res: Resources, texts: list[str], batch: int) -> tuple[np.ndarray, dict[str, float]]:
    t0 = time.perf_counter()
    parts = [res.encoder.encode_texts(texts[i:i + batch]) for i in range(0, len(texts), batch)]
    return np.concatenate(parts), {"encode": time.perf_counter() - t0}
