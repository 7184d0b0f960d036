"""What one app instance holds at run time: settings, metrics, cache, admission counter, worker pool,
and the resources once they are loaded (or the reason they are not)."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import Request

from app.batching import ImageBatcher, TextBatcher, image_slots
from app.cache import ResponseCache
from app.config import Settings, cpu_cores
from app.errors import NotReady
from app.fetch import FetchSettings, UrlFetcher
from app.metrics import Metrics
from app.resources import Resources
from app.thumbnails import ThumbnailCache

T = TypeVar("T")


class InFlightLimiter:
    """A counter checked without waiting: a full service says so at once instead of queueing."""

    def __init__(self, limit: int):
        self.limit = limit
        self._count = 0
        self._lock = threading.Lock()

    def try_acquire(self) -> bool:
        with self._lock:
            if self._count >= self.limit:
                return False
            self._count += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._count -= 1

    @property
    def count(self) -> int:
        return self._count


class ServiceState:
    def __init__(self, settings: Settings, resources: Resources | None = None):
        self.settings = settings
        self.metrics = Metrics()
        self.cache = ResponseCache(settings.cache_size)
        self.thumbnails = ThumbnailCache(settings.thumbnail_cache_size, settings.thumbnail_px,
                                         settings.max_image_pixels)
        self.limiter = InFlightLimiter(settings.max_in_flight)
        self.fetcher = UrlFetcher(FetchSettings.from_settings(settings))  # image_url queries (off by default)
        self._pool: ThreadPoolExecutor | None = None
        # concurrent text queries share forward passes; one batch in flight per inference thread
        self.batcher = TextBatcher(self.run, slots=settings.inference_threads,
                                   max_batch=settings.text_batch_size)
        # concurrent image queries (and writes' images) share forward passes too; the image session
        # runs on `image_threads` cores, so `set_ready` sets how many batches run at once
        self.image_batcher = ImageBatcher(self.run, slots=settings.inference_threads,
                                          max_batch=settings.image_batch_size)
        self._pool_lock = threading.Lock()
        self.resources: Resources | None = None
        self.reason = "loading the model and the collections"
        self.reload_error: str | None = None  # why the last reload failed while old resources served
        self._loading = False
        self._loading_lock = threading.Lock()
        if resources is not None:
            self.set_ready(resources)

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

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking work (decode, encode, search) on the bounded inference pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(fn, *args))


def get_state(request: Request) -> ServiceState:
    return request.app.state.service
