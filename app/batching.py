"""Micro-batching of concurrent text queries and image queries (uploads, and the images writes embed).

Queries that arrive while the encoder is busy are gathered and encoded together: one forward
pass over a batch of short queries costs far less than the same queries one at a time (at batch 1 the
text tower is bound by per-op overhead and weight reads). Image queries are batched the same way
(`ImageBatcher`): each upload is decoded inside the batch job (a file that does not decode fails its
own query only), then the batch is encoded in one `encode_images` call; the image tower's ONNX
session runs on every core (`image_slots`), so a lone image query uses the whole machine. There is no timer and no added latency at
low load: a query that finds a free encoder slot starts at once; only queries that would have waited
anyway are grouped, up to `max_batch`. Everything here runs on the event loop thread (no locks);
the batch itself (encode, then each query's own `finish`, e.g. its search) runs on the bounded
inference pool, so a lone query costs one hop to the pool, as before batching.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipsearch.encoder import image_session_threads, takes_pixels
from clipsearch.images import decode_image_with_format

# What a query does with its vector once the batch is encoded (e.g. search its collection). It runs
# on the inference thread; an exception it raises reaches that query alone.
Finish = Callable[[np.ndarray], Any]


@dataclass
class _Batch:
    res: Any  # the Resources whose encoder encodes this batch
    items: list[tuple[str, Finish, asyncio.Future]] = field(default_factory=list)


def text_batch_job(res: Any, queries: list[str], finishes: list[Finish]
                   ) -> tuple[list[tuple[bool, Any]], dict[str, float]]:
    """Encode a batch of queries, then run each query's `finish` on its vector: per query
    (True, result) or (False, the exception), and the batch's stage timings."""
    t0 = time.perf_counter()
    vecs = res.encoder.encode_texts(queries)
    t1 = time.perf_counter()
    out: list[tuple[bool, Any]] = []
    for vec, finish in zip(vecs, finishes):
        try:
            out.append((True, finish(vec)))
        except Exception as exc:  # noqa: BLE001 - it belongs to that query only
            out.append((False, exc))
    t2 = time.perf_counter()
    return out, {"encode": t1 - t0, "search": (t2 - t1) / max(1, len(queries)), "batch_size": len(queries)}


@dataclass(frozen=True)
class ImageQuery:
    """One image to embed: the uploaded bytes and the decoder's pixel cap. `tta`: embed it with the
    model's test-time augmentation (`ClipEncoder.encode_pixels`), as ingest embeds the images a
    collection stores: writes and /embed/image do; a search embeds its image plain, once, unless the
    service is told otherwise (`Settings.query_image_tta`)."""

    data: bytes
    max_pixels: int
    tta: bool = False


@dataclass
class PreparedImage:
    """An upload decoded (and, where the encoder can, preprocessed to pixels) before it joins a batch,
    so decoding runs on every inference thread in parallel while the batch's forward pass is shared."""

    image: Any = None  # the PIL image, for encoders without `preprocess_image`
    pixels: Any = None  # the preprocessed tensor [3, H, W]
    decode_s: float = 0.0
    tta: bool = False  # `ImageQuery.tta`
    format: str | None = None  # the PIL format the bytes were decoded from (an upload's file suffix)


def prepare_image(encoder: Any, query: ImageQuery) -> PreparedImage:
    """Decode `query` (an undecodable upload raises here, for its own request) and preprocess it when
    the encoder says how (`ClipEncoder.preprocess_image`)."""
    t0 = time.perf_counter()
    image, fmt = decode_image_with_format(query.data, max_pixels=query.max_pixels)
    if not takes_pixels(encoder):
        return PreparedImage(image=image, decode_s=time.perf_counter() - t0, tta=query.tta, format=fmt)
    try:
        return PreparedImage(pixels=encoder.preprocess_image(image), decode_s=time.perf_counter() - t0,
                             tta=query.tta, format=fmt)
    finally:
        image.close()


def _encode(encoder: Any, items: list[PreparedImage], tta: bool) -> Any:
    """One encoder call for `items`: preprocessed pixels through `encode_pixels` together, else images."""
    if all(p.pixels is not None for p in items):
        import torch

        vecs = encoder.encode_pixels(torch.stack([p.pixels for p in items]), tta=tta)
        return vecs.cpu().numpy() if isinstance(vecs, torch.Tensor) else np.asarray(vecs)
    return encoder.encode_images([p.image if p.image is not None else p.pixels for p in items], tta=tta)


def image_batch_job(res: Any, queries: list[ImageQuery | PreparedImage], finishes: list[Finish]
                    ) -> tuple[list[tuple[bool, Any]], dict[str, float]]:
    """Encode a batch of images, then run each query's `finish` on its vector; like `text_batch_job`.
    An `ImageQuery` is decoded here first (one that fails is that query's error); a `PreparedImage`
    already was. Images with and without test-time augmentation (`ImageQuery.tta`) are encoded in one
    call each, so a batch of searches is one forward of plain images."""
    prepared: list[PreparedImage | None] = []
    out: list[tuple[bool, Any] | None] = []
    for q in queries:
        try:
            prepared.append(q if isinstance(q, PreparedImage) else prepare_image(res.encoder, q))
            out.append(None)
        except Exception as exc:  # noqa: BLE001 - a bad upload fails its own query only
            prepared.append(None)
            out.append((False, exc))
    good = [p for p in prepared if p is not None]
    decode = sum(p.decode_s for p in good)  # on the pool before the batch, or here just now
    t1 = time.perf_counter()
    try:
        vecs: list[Any] = [None] * len(good)
        for tta in (False, True):
            idx = [i for i, p in enumerate(good) if p.tta == tta]
            if idx:
                for i, v in zip(idx, _encode(res.encoder, [good[i] for i in idx], tta=tta)):
                    vecs[i] = v
    finally:
        for p in good:
            if p.image is not None:
                p.image.close()
    t2 = time.perf_counter()
    it = iter(vecs)
    for i, finish in enumerate(finishes):
        if out[i] is not None:
            continue
        try:
            out[i] = (True, finish(next(it)))
        except Exception as exc:  # noqa: BLE001 - it belongs to that query only
            out[i] = (False, exc)
    t3 = time.perf_counter()
    n = max(1, len(good))
    return out, {"decode": decode / max(1, len(queries)), "encode": t2 - t1, "search": (t3 - t2) / n,
                 "batch_size": len(queries)}  # type: ignore[return-value]


class MicroBatcher:
    """`await search(res, item, finish)` → (finish(item's vector), stage timings of its batch).

    `job(res, items, finishes)` encodes one batch (`text_batch_job`, `image_batch_job`); at most
    `slots` batches run at once, each on the inference pool; items that arrive while every slot is
    busy wait, up to `max_batch` per batch. `slots` may be changed at any time (`Engine`
    sets it from the loaded encoder)."""

    job: Callable[..., tuple[list[tuple[bool, Any]], dict[str, float]]] = staticmethod(text_batch_job)

    def __init__(self, run: Callable[..., Awaitable[Any]], slots: int, max_batch: int,
                 job: Callable[..., tuple[list[tuple[bool, Any]], dict[str, float]]] | None = None):
        if job is not None:
            self.job = job
        self._run = run  # runs a blocking function on the inference pool
        self.slots = max(1, slots)
        self.max_batch = max(1, max_batch)
        self._busy = 0
        self._waiting: list[_Batch] = []
        self._tasks: set[asyncio.Task] = set()

    @property
    def busy(self) -> int:
        return self._busy

    async def search(self, res: Any, query: Any, finish: Finish) -> tuple[Any, dict[str, float]]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        if self.max_batch == 1 or self._busy < self.slots:
            self._start(_Batch(res, [(query, finish, fut)]))
        else:
            last = self._waiting[-1] if self._waiting else None
            if last is None or last.res is not res or len(last.items) >= self.max_batch:
                last = _Batch(res)
                self._waiting.append(last)
            last.items.append((query, finish, fut))
        return await fut

    async def _one_by_one(self, batch: _Batch) -> None:
        for query, finish, fut in batch.items:
            if fut.done():
                continue
            try:
                out, stages = await self._run(self.job, batch.res, [query], [finish])
            except Exception as exc:
                fut.set_exception(exc)
            else:
                _settle(fut, out[0], stages)

    def _start(self, batch: _Batch) -> None:
        self._busy += 1
        task = asyncio.get_running_loop().create_task(self._execute(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, batch: _Batch) -> None:
        try:
            queries = [q for q, _, _ in batch.items]
            finishes = [f for _, f, _ in batch.items]
            try:
                out, stages = await self._run(self.job, batch.res, queries, finishes)
            except Exception:
                if len(batch.items) == 1:
                    raise
                # One bad query must not fail the others that happened to share its forward pass:
                # run each alone, so an error reaches only the queries that fail by themselves.
                await self._one_by_one(batch)
                return
            for result, (_, _, fut) in zip(out, batch.items):
                _settle(fut, result, stages)
        except BaseException as exc:  # every waiter gets the error; none hangs
            for _, _, fut in batch.items:
                if not fut.done():
                    fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._busy -= 1
            while self._waiting and self._busy < self.slots:
                self._start(self._waiting.pop(0))


class TextBatcher(MicroBatcher):
    """Text queries: `await search(res, query_text, finish)`."""

    job = staticmethod(text_batch_job)


class ImageBatcher(MicroBatcher):
    """Image queries: `await upload(res, ImageQuery(data, max_pixels), finish)` decodes (and
    preprocesses) the upload on the inference pool first, in parallel with other uploads, then
    encodes it in a shared batch (`search(res, item, finish)` takes an `ImageQuery` or a
    `PreparedImage` as it is). Writes that embed an uploaded image share it
    (`Engine.image_batcher`), so their forward passes batch with queries'."""

    job = staticmethod(image_batch_job)

    async def prepare(self, res: Any, query: ImageQuery) -> PreparedImage:
        """Decode (and preprocess) `query` on the inference pool: the upload's one decode."""
        return await self._run(prepare_image, res.encoder, query)

    async def upload(self, res: Any, query: ImageQuery, finish: Finish) -> tuple[Any, dict[str, float]]:
        return await self.search(res, await self.prepare(res, query), finish)


def image_slots(encoder: Any, inference_threads: int, cores: int | None) -> int:
    """Image batches in flight at once: one per `threads` cores when the encoder's image tower runs
    on an ONNX session with `threads` intra-op threads (a lone query then uses them all), else one
    per inference thread (the torch path runs each call on `torch_threads`)."""
    threads = image_session_threads(encoder)
    if not threads:
        return max(1, inference_threads)
    return max(1, min(inference_threads, (cores or 1) // int(threads)))


def _settle(fut: asyncio.Future, result: tuple[bool, Any], stages: dict[str, float]) -> None:
    if fut.done():
        return
    ok, value = result
    if ok:
        fut.set_result((value, stages))
    else:
        fut.set_exception(value)
