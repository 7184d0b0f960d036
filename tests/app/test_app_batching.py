"""Micro-batching: concurrent text queries share forward passes and get the same answers."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest

from app.batching import TextBatcher
from clipsearch.index import IndexParams, VectorIndex

DIM = 8


class RecordingEncoder:
    """Deterministic embedding per query; records batch sizes; slow enough that queries pile up."""

    dim = DIM

    def __init__(self, delay=0.02):
        self.batches: list[int] = []
        self.delay = delay
        self.lock = threading.Lock()

    def encode_texts(self, texts):
        with self.lock:
            self.batches.append(len(texts))
        time.sleep(self.delay)
        out = np.stack([np.random.default_rng(abs(hash(t)) % 2**32).normal(size=DIM) for t in texts])
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def _resources(encoder):
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(50, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return SimpleNamespace(encoder=encoder, image_index=VectorIndex.build(vecs, IndexParams(kind="flat")))


def _search(res, k):
    """Each query's own work after the shared encode: search the index for its k."""
    def finish(vec):
        scores, ids = res.image_index.search(vec[None], k)
        return scores[0], ids[0]
    return finish


def _run_all(batcher_kwargs, queries, ks, encoder):
    res = _resources(encoder)
    pool = ThreadPoolExecutor(2)

    async def main():
        loop = asyncio.get_running_loop()

        async def run(fn, *args):
            return await loop.run_in_executor(pool, fn, *args)

        batcher = TextBatcher(run, **batcher_kwargs)
        return await asyncio.gather(*(batcher.search(res, q, _search(res, k)) for q, k in zip(queries, ks)))

    try:
        return asyncio.run(main()), res
    finally:
        pool.shutdown()


def test_concurrent_queries_are_batched_and_answers_match_single_queries():
    queries = [f"query number {i}" for i in range(20)]
    ks = [1 + i % 7 for i in range(20)]
    enc = RecordingEncoder()
    results, res = _run_all({"slots": 1, "max_batch": 8}, queries, ks, enc)
    assert sum(enc.batches) == 20
    assert max(enc.batches) == 8 and enc.batches[0] == 1  # the first query starts at once, alone
    assert len(enc.batches) < 20
    for q, k, ((scores, ids), stages) in zip(queries, ks, results):
        ref_scores, ref_ids = res.image_index.search(enc.encode_texts([q]), k)
        assert list(ids) == list(ref_ids[0]) and len(ids) == k
        np.testing.assert_allclose(scores, ref_scores[0], rtol=1e-5)
        assert stages["batch_size"] >= 1


def test_batch_size_one_turns_batching_off():
    enc = RecordingEncoder(delay=0.005)
    _run_all({"slots": 1, "max_batch": 1}, [f"q{i}" for i in range(6)], [3] * 6, enc)
    assert enc.batches == [1] * 6


def test_an_encoder_error_reaches_every_waiter():
    class Broken(RecordingEncoder):
        def encode_texts(self, texts):
            time.sleep(0.01)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _run_all({"slots": 1, "max_batch": 4}, ["a", "b", "c"], [1, 1, 1], Broken())


def test_a_failing_query_does_not_fail_the_others_in_its_batch():
    class Poisoned(RecordingEncoder):
        def encode_texts(self, texts):
            if "poison" in texts:
                with self.lock:
                    self.batches.append(len(texts))
                time.sleep(self.delay)
                raise ValueError("cannot encode this one")
            return super().encode_texts(texts)

    enc = Poisoned()
    res = _resources(enc)
    pool = ThreadPoolExecutor(2)
    queries = ["first"] + [f"q{i}" for i in range(3)] + ["poison"] + [f"r{i}" for i in range(3)]

    async def main():
        loop = asyncio.get_running_loop()

        async def run(fn, *args):
            return await loop.run_in_executor(pool, fn, *args)

        batcher = TextBatcher(run, slots=1, max_batch=8)
        return await asyncio.gather(*(batcher.search(res, q, _search(res, 2)) for q in queries),
                                    return_exceptions=True)

    try:
        out = asyncio.run(main())
    finally:
        pool.shutdown()
    assert max(enc.batches) > 1  # the poison shared a forward pass with others
    for q, r in zip(queries, out):
        if q == "poison":
            assert isinstance(r, ValueError) and "cannot encode" in str(r)
        else:
            (scores, ids), _ = r
            ref_scores, ref_ids = res.image_index.search(enc.encode_texts([q]), 2)
            assert list(ids) == list(ref_ids[0])


# --- image queries (ImageBatcher) -------------------------------------------------------------

def _png(color) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (24, 16), color).save(buf, format="PNG")
    return buf.getvalue()


class RecordingImageEncoder:
    """An embedding per image from its mean colour; records batch sizes; slow enough to pile up."""

    dim = DIM

    def __init__(self, delay=0.02):
        self.batches: list[int] = []
        self.delay = delay
        self.lock = threading.Lock()

    def encode_images(self, images, tta=True):
        with self.lock:
            self.batches.append(len(images))
        time.sleep(self.delay)
        out = np.stack([np.concatenate([np.asarray(im, np.float32).mean((0, 1)) + 1, np.ones(DIM - 3)])
                        for im in images])
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def test_concurrent_image_queries_are_batched_and_a_bad_upload_fails_alone():
    from app.batching import ImageBatcher, ImageQuery
    from clipsearch.images import ImageDecodeError, decode_image

    colors = [(10 * i, 200 - 9 * i, 30 + 5 * i) for i in range(12)]
    uploads = [_png(c) for c in colors]
    uploads[6] = b"not an image at all"
    enc = RecordingImageEncoder()
    res = _resources(enc)
    pool = ThreadPoolExecutor(2)

    async def main():
        loop = asyncio.get_running_loop()

        async def run(fn, *args):
            return await loop.run_in_executor(pool, fn, *args)

        batcher = ImageBatcher(run, slots=1, max_batch=4)
        return await asyncio.gather(*(batcher.search(res, ImageQuery(d, 10**6), _search(res, 3))
                                      for d in uploads), return_exceptions=True)

    try:
        out = asyncio.run(main())
    finally:
        pool.shutdown()
    assert enc.batches[0] == 1 and max(enc.batches) == 4 and sum(enc.batches) == 11
    for i, r in enumerate(out):
        if i == 6:
            assert isinstance(r, ImageDecodeError)
            continue
        (scores, ids), stages = r
        ref_scores, ref_ids = res.image_index.search(enc.encode_images([decode_image(uploads[i])]), 3)
        assert list(ids) == list(ref_ids[0])
        assert {"decode", "encode", "search", "batch_size"} <= set(stages)


def test_image_slots_follow_the_image_session_threads():
    from app.batching import image_slots

    def with_threads(n):
        return SimpleNamespace(image_backend=SimpleNamespace(threads=n))

    assert image_slots(with_threads(2), inference_threads=2, cores=2) == 1  # one batch on both cores
    assert image_slots(with_threads(1), inference_threads=2, cores=2) == 2
    assert image_slots(with_threads(1), inference_threads=2, cores=8) == 2  # never above the pool
    assert image_slots(SimpleNamespace(image_backend=None), inference_threads=3, cores=2) == 3  # torch
    assert image_slots(SimpleNamespace(), inference_threads=2, cores=2) == 2  # a fake encoder


def test_service_state_shares_one_image_batcher_sized_from_the_encoder(tmp_path):
    """`ServiceState.image_batcher` is what /search/image (and writes) go through; once resources are
    set its slots follow the encoder's image session (default `image_threads` = every core)."""
    from app.batching import ImageBatcher
    from app.config import Settings, cpu_cores
    from app.engine import Engine as ServiceState

    settings = Settings(artifacts_dir=tmp_path)
    assert settings.image_threads == cpu_cores()
    state = ServiceState(settings)
    assert isinstance(state.image_batcher, ImageBatcher)
    state.image_batcher.slots = 99
    res = SimpleNamespace(encoder=SimpleNamespace(image_backend=SimpleNamespace(threads=cpu_cores())),
                          image_count=0, caption_count=0, model={}, version="v", default_collection="c")
    state.set_ready(res)
    assert state.image_batcher.slots == 1


class PixelImageEncoder(RecordingImageEncoder):
    """Like the real ClipEncoder: preprocess one image to pixels, encode a stacked batch of them."""

    def __init__(self, delay=0.02):
        super().__init__(delay)
        self.pixel_batches: list[int] = []

    def preprocess_image(self, image):
        import torch

        return torch.from_numpy(np.asarray(image.convert("RGB"), np.float32).copy()).permute(2, 0, 1)

    def encode_pixels(self, pixels, tta=True):
        import torch

        with self.lock:
            self.pixel_batches.append(int(pixels.shape[0]))
        time.sleep(self.delay)
        out = torch.cat([pixels.mean((2, 3)) + 1, torch.ones(pixels.shape[0], DIM - 3)], 1)
        return torch.nn.functional.normalize(out, dim=1)


def test_uploads_are_decoded_on_the_pool_then_encoded_as_one_pixel_batch():
    from app.batching import ImageBatcher, ImageQuery
    from clipsearch.images import ImageDecodeError, decode_image

    uploads = [_png((12 * i, 90, 250 - 11 * i)) for i in range(10)]
    uploads[4] = b"\xff\xd8 broken jpeg"
    enc = PixelImageEncoder()
    res = _resources(enc)
    pool = ThreadPoolExecutor(2)

    async def main():
        loop = asyncio.get_running_loop()

        async def run(fn, *args):
            return await loop.run_in_executor(pool, fn, *args)

        batcher = ImageBatcher(run, slots=1, max_batch=4)
        return await asyncio.gather(*(batcher.upload(res, ImageQuery(d, 10**6), _search(res, 2)) for d in uploads),
                                    return_exceptions=True)

    try:
        out = asyncio.run(main())
    finally:
        pool.shutdown()
    assert enc.batches == []  # never through encode_images: pixels were prepared on the pool
    assert sum(enc.pixel_batches) == 9 and max(enc.pixel_batches) > 1
    for i, r in enumerate(out):
        if i == 4:
            assert isinstance(r, ImageDecodeError)
            continue
        (scores, ids), stages = r
        ref = enc.encode_pixels(enc.preprocess_image(decode_image(uploads[i]))[None]).numpy()
        _, ref_ids = res.image_index.search(ref, 2)
        assert list(ids) == list(ref_ids[0]) and stages["decode"] >= 0


def test_a_real_encoder_gets_the_same_vectors_through_prepared_pixels():
    """ClipEncoder (tiny ViT, torch): prepare_image + one encode_pixels batch = encode_images."""
    import torch

    from app.batching import ImageQuery, image_batch_job, prepare_image
    from clipsearch.encoder import ClipEncoder
    from clipsearch.images import decode_image
    from clipsearch.models import load_model

    torch.manual_seed(0)
    enc = ClipEncoder(load_model("test-tiny-vit", None, "cpu"))
    uploads = [_png((40 * i, 20, 200)) for i in range(3)]
    prepared = [prepare_image(enc, ImageQuery(d, 10**6)) for d in uploads]
    assert all(p.pixels is not None and p.image is None for p in prepared)
    out, stages = image_batch_job(SimpleNamespace(encoder=enc), prepared, [lambda v: v] * 3)
    ref = enc.encode_images([decode_image(d) for d in uploads])
    np.testing.assert_allclose(np.stack([v for ok, v in out]), ref, atol=1e-5)
    assert stages["batch_size"] == 3
