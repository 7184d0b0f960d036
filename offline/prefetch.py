"""Decoding beside the forward pass without worker processes: a bounded thread-pool pipeline.

PIL releases the GIL while it decodes and resizes, so a few threads in the encoding process overlap
JPEG decoding and preprocessing with the forward pass (which runs in ONNX Runtime's or torch's own
threads) at no cost in processes, pickling or shared memory. At most `prefetch` batches beyond the
one being encoded are decoded ahead, so memory stays flat however many images there are (a
DataLoader with `num_workers=0` decodes each batch only when asked, in the encoding thread).

`threaded_batches(dataset, batch_size, threads, collate=collate_images)` yields what a DataLoader
with that `collate_fn` yields, in order (for `offline.embed.collate_images`: indices decoded,
stacked pixels or None, [(index, error)] of the rest).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from torch.utils.data import Dataset

__all__ = ["DECODE_THREADS", "threaded_batches"]

DECODE_THREADS = 2  # decoding threads beside the forward pass (PIL decodes with the GIL released)


def threaded_batches(dataset: Dataset, batch_size: int, threads: int = DECODE_THREADS, prefetch: int = 2,
                     collate: Callable[[list[Any]], Any] = list) -> Iterator[Any]:
    n = len(dataset)  # type: ignore[arg-type]
    starts = iter(range(0, n, max(1, batch_size)))
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="decode") as pool:
        queue: deque[list[Future]] = deque()

        def submit() -> None:
            start = next(starts, None)
            if start is not None:
                queue.append([pool.submit(dataset.__getitem__, i) for i in range(start, min(start + batch_size, n))])

        for _ in range(1 + max(0, prefetch)):
            submit()
        try:
            while queue:
                batch = [f.result() for f in queue.popleft()]
                submit()
                yield collate(batch)
        finally:
            for futures in queue:  # a consumer that stops early leaves nothing running
                for f in futures:
                    f.cancel()
