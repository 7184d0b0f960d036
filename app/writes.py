"""Live writes without HTTP: upload, delete, caption replace and compaction of a served collection.

`Writer` is the engine's write half (`app.engine.Engine.writes`). A write is admitted through its own
bound (`write_max_in_flight`, else 429 at once), decoded once with the same checks as /search/image
and encoded in the image micro-batcher beside searches, so writes take turns with searches instead
of starving them. The commit (image file first, then the catalog, through `Collection`, the one
write path) runs on one writer thread: SQLite serialises writers anyway, and an fsync never blocks
an inference thread. A write is answered only after its commit, and the store has caught up by
then, so the next search sees it (read-your-write); the store's version changes with it, and so
every cache key.

After a write, a background compaction starts when the tombstones or the rows added past an HNSW
graph reach the configured thresholds (in a store that `compacts`; Qdrant optimises itself).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from clipsearch.artifacts import ArtifactLayout
from clipsearch.collection import Collection
from clipsearch.images import ImageDecodeError
from clipsearch.media import store_media, suffix_for
from clipsearch.store import Item, NewItem, StoreError, VectorStore

from app.batching import ImageBatcher, ImageQuery
from app.config import Settings
from app.errors import InvalidSearch, NotFound, Overloaded, PayloadTooLarge, ReadOnlyCollection, WriteRefused
from app.limits import InFlightLimiter
from app.metrics import Metrics
from app.resources import Resources

log = logging.getLogger(__name__)

Run = Callable[..., Awaitable[Any]]  # runs a blocking function on the inference pool
T = TypeVar("T")


@dataclass(frozen=True)
class WriteResult:
    item: Item
    created: bool
    version: str
    stages: Mapping[str, float] = field(default_factory=dict)  # seconds: decode, encode, commit


def encode_captions_job(res: Resources, captions: Sequence[str]) -> np.ndarray:
    return np.asarray(res.encoder.encode_texts(list(captions)), np.float32)


def clean_captions(captions: Sequence[str] | None, limit: int) -> list[str] | None:
    """Whitespace runs collapsed; none empty, at most `limit`."""
    if captions is None:
        return None
    cleaned = [" ".join(c.split()) for c in captions]
    if any(not c for c in cleaned):
        raise InvalidSearch("a caption is empty or only whitespace")
    if len(cleaned) > limit:
        raise InvalidSearch(f"at most {limit} captions per item")
    return cleaned


def parse_metadata(raw: str | None) -> dict[str, Any] | None:
    """An upload's metadata field: a JSON object of at most 64 named fields (None: none given)."""
    if raw is None or not raw.strip():
        return None
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise InvalidSearch("metadata must be a JSON object") from None
    if not isinstance(value, dict):
        raise InvalidSearch("metadata must be a JSON object")
    if len(value) > 64 or any(len(k) > 64 or not k for k in value):
        raise InvalidSearch("metadata: at most 64 fields, each name 1-64 characters")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class Writer:
    def __init__(self, settings: Settings, metrics: Metrics, image_batcher: ImageBatcher, run: Run):
        self.settings = settings
        self.metrics = metrics
        self.image_batcher = image_batcher
        self.run = run
        self.limiter = InFlightLimiter(settings.write_max_in_flight)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipsearch-writer")
        self._compacting: set[str] = set()
        self._compact_lock = threading.Lock()

    def close(self) -> None:
        self._writer.shutdown(wait=True)

    # -- admission -------------------------------------------------------------------------------
    def _admit(self, op: str) -> None:
        if not self.limiter.try_acquire():
            self.metrics.writes.labels(op, "rejected").inc()
            raise Overloaded(f"server busy: {self.limiter.limit} writes in flight; retry shortly",
                             headers={"Retry-After": str(max(self.settings.retry_after_s, 1))})

    async def _commit(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._writer, lambda: fn(*args))

    @staticmethod
    def _check_writable(store: VectorStore) -> None:
        if not store.writable:
            raise ReadOnlyCollection(f"collection {store.name!r} is open read-only")

    # -- operations, each admitted and counted in the writes metric -----------------------------------
    async def _counted(self, op: str, work: Callable[[], Awaitable[T]], outcome: Callable[[T], str],
                       failures: Sequence[tuple[type[Exception] | tuple[type[Exception], ...], str | None]]) -> T:
        """`await work()` under the write bound; the writes metric counts `op` with `outcome(result)`,
        or the label of the first of `failures` the error is (None: not counted), else "error"."""
        self._admit(op)
        try:
            result = await work()
        except Exception as exc:
            label = next((lab for kinds, lab in failures if isinstance(exc, kinds)), "error")
            if label is not None:
                self.metrics.writes.labels(op, label).inc()
            raise
        finally:
            self.limiter.release()
        self.metrics.writes.labels(op, outcome(result)).inc()
        return result

    async def upload(self, res: Resources, store: VectorStore, read: Callable[[], Awaitable[bytes]],
                     captions: Sequence[str] | None, metadata: str | None, image_id: str | None) -> WriteResult:
        """Add (or update) the item of the bytes `read()` gives, read once the cheap checks passed."""
        final = clean_captions(captions, self.settings.max_captions)
        meta = parse_metadata(metadata)
        try:
            data = await read()
        except (PayloadTooLarge, ImageDecodeError):
            self.metrics.writes.labels("upload", "invalid").inc()
            raise
        before = store.version
        return await self._counted(
            "upload", lambda: self._upload(res, store, data, final, meta, image_id),
            lambda r: "created" if r.created else ("updated" if r.version != before else "existing"),
            [((ImageDecodeError, InvalidSearch), "invalid"), (NotFound, None)])

    async def delete(self, store: VectorStore, image_id: str) -> None:
        await self._counted("delete", lambda: self._delete(store, image_id), lambda _: "deleted",
                            [(NotFound, "not_found")])

    async def replace_captions(self, res: Resources, store: VectorStore, image_id: str,
                               captions: Sequence[str]) -> WriteResult:
        cleaned = clean_captions(captions, self.settings.max_captions) or []
        return await self._counted("captions", lambda: self._replace_captions(res, store, image_id, cleaned),
                                   lambda _: "replaced", [(NotFound, "not_found")])

    async def _upload(self, res: Resources, store: VectorStore, data: bytes, captions: Sequence[str] | None,
                      metadata: Mapping[str, Any] | None, image_id: str | None) -> WriteResult:
        self._check_writable(store)
        sha = hashlib.sha256(data).hexdigest()  # the one hash: the default id and the media file's name
        image_id = image_id or sha
        existing = store.get(image_id)
        final_captions = tuple(captions) if captions is not None else (existing.captions if existing else ())
        final_meta = dict(metadata) if metadata is not None else (dict(existing.metadata) if existing else {})
        media_dir = ArtifactLayout(self.settings.artifacts_dir).collection(store.name).media_dir
        if (existing is not None and _sha_of(existing.path) == sha and existing.captions == final_captions
                and dict(existing.metadata) == final_meta):
            # the same bytes again (and nothing else new): one item, no write
            return WriteResult(existing, False, store.version)
        # decoded once (every check /search/image makes; its format names the media file) and embedded
        # in the image batcher, beside queries
        prepared = await self.image_batcher.prepare(res, ImageQuery(data, self.settings.max_image_pixels, tta=True))
        vec, batch_stages = await self.image_batcher.search(res, prepared, lambda v: np.asarray(v, np.float32))
        t0 = time.perf_counter()
        cap_vecs = (await self.run(encode_captions_job, res, final_captions) if final_captions
                    else np.zeros((0, vec.shape[0]), np.float32))
        stages = {"decode": batch_stages["decode"],
                  "encode": batch_stages["encode"] + (time.perf_counter() - t0)}
        root = self.settings.artifacts_dir

        def commit() -> Item | None:
            # writes run one at a time here: a twin upload that committed first makes this one a no-op
            now = store.get(image_id)
            if (now is not None and _sha_of(now.path) == sha and now.captions == final_captions
                    and dict(now.metadata) == final_meta):
                return None
            path, _ = store_media(media_dir, data, suffix_for(prepared.format), sha)  # the file first, durable...
            item = Item(image_id, _relative(path, root), final_captions, final_meta)
            # ...then the commit, with the new rows' hubness offsets, as ingest gives them
            Collection.served(store, res.banks).add_embedded([NewItem(
                item.image_id, item.path, vec, captions=final_captions,
                caption_vectors=cap_vecs if final_captions else None, metadata=final_meta, size=len(data),
                sha256=sha)])
            return item if now is None else None

        t0 = time.perf_counter()
        try:
            written = await self._commit(commit)
        except StoreError as exc:
            raise WriteRefused(str(exc)) from None
        stages["commit"] = time.perf_counter() - t0  # media file + catalog commit (fsyncs) + catch-up
        item = written if written is not None else store.get(image_id)  # an update: read back what merged
        if item is None:  # deleted again before we could read it back
            raise NotFound("unknown image id")
        self.maybe_compact(store)
        return WriteResult(item, written is not None, store.version, stages)

    async def _delete(self, store: VectorStore, image_id: str) -> None:
        self._check_writable(store)
        if store.get(image_id) is None:
            raise NotFound("unknown image id")
        n = await self._commit(store.delete, [image_id])
        if not n:
            raise NotFound("unknown image id")
        self.maybe_compact(store)

    async def _replace_captions(self, res: Resources, store: VectorStore, image_id: str,
                                captions: Sequence[str]) -> WriteResult:
        self._check_writable(store)
        if store.get(image_id) is None:
            raise NotFound("unknown image id")
        vecs = (await self.run(encode_captions_job, res, captions) if captions
                else np.zeros((0, store.dim), np.float32))
        try:
            await self._commit(Collection.served(store, res.banks).replace_captions, image_id, list(captions), vecs)
        except StoreError as exc:
            if store.get(image_id) is not None:
                raise WriteRefused(str(exc)) from None
            raise NotFound("unknown image id") from None
        item = store.get(image_id)
        if item is None:  # deleted meanwhile
            raise NotFound("unknown image id")
        self.maybe_compact(store)
        return WriteResult(item, False, store.version)

    # -- compaction --------------------------------------------------------------------------------
    def compact_now(self, store: VectorStore) -> dict[str, Any]:
        """Run a compaction (blocking; call it off the event loop)."""
        if not store.compacts:
            return {"compacted": False, "reason": "this store compacts itself"}
        with self._compact_lock:
            if store.name in self._compacting:
                return {"compacted": False, "reason": "a compaction is already running"}
            self._compacting.add(store.name)
        t0 = time.perf_counter()
        try:
            out = dict(store.compact())
        finally:
            with self._compact_lock:
                self._compacting.discard(store.name)
        if out.get("compacted"):
            self.metrics.compactions.labels(store.name).inc()
            self.metrics.compaction_seconds.labels(store.name).observe(time.perf_counter() - t0)
        return out

    def maybe_compact(self, store: VectorStore) -> bool:
        """Start a background compaction when enough tombstones or delta rows have piled up."""
        if not store.compacts or store.name in self._compacting or not store.writable:
            return False
        stats = store.stats()
        if stats is None:
            return False
        dead = sum(stats[t]["tombstones"] for t in ("images", "captions"))
        delta = sum(stats[t]["delta"] for t in ("images", "captions"))
        s = self.settings
        if not ((s.compact_tombstones and dead >= s.compact_tombstones)
                or (s.compact_delta and delta >= s.compact_delta)):
            return False

        def run() -> None:
            try:
                self.compact_now(store)
            except Exception:  # noqa: BLE001 - a failed compaction leaves the old state serving
                log.exception("collection %s: compaction failed; the current state keeps serving", store.name)
                return
            self.maybe_compact(store)  # writes that landed during the build may have crossed it again

        threading.Thread(target=run, name=f"clipsearch-compact-{store.name}", daemon=True).start()
        return True


def _sha_of(path: str) -> str | None:
    """The sha256 an owned media path is named by (media/<aa>/<sha><suffix>), else None."""
    name = Path(path).name
    stem = name.split(".", 1)[0]
    return stem if len(stem) == 64 and all(c in "0123456789abcdef" for c in stem) else None


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path.resolve())
