"""offline/prefetch.py: decoded batches from a thread pool, in order, a bounded few ahead."""

import threading
import time

import torch

from offline.embed import ImageFiles, collate_images
from offline.prefetch import threaded_batches


class Slow(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n
        self.started: list[int] = []
        self.lock = threading.Lock()

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        with self.lock:
            self.started.append(i)
        time.sleep(0.002)
        return i


def test_batches_in_order_and_bounded_ahead():
    ds = Slow(50)
    it = threaded_batches(ds, batch_size=4, threads=3, prefetch=2)
    first = next(it)
    assert first == [0, 1, 2, 3]
    time.sleep(0.1)
    assert max(ds.started) < 4 * 4  # the batch handed out, plus at most 1 + 2 more decoded ahead
    rest = list(it)
    assert [i for b in [first, *rest] for i in b] == list(range(50))
    assert [len(b) for b in rest][-1] == 2


def test_same_as_the_dataloader_with_bad_files(tmp_path):
    from PIL import Image
    from torch.utils.data import DataLoader

    paths = []
    for i in range(7):
        p = tmp_path / f"{i}.png"
        if i == 3:
            p.write_bytes(b"not a png")
        else:
            Image.new("RGB", (20 + i, 16), (30 * i, 10, 200)).save(p)
        paths.append(str(p))

    def prep(im):
        return torch.from_numpy(__import__("numpy").asarray(im.resize((8, 8)), dtype="float32")).permute(2, 0, 1)

    files = ImageFiles(paths, prep)
    ref = list(DataLoader(files, batch_size=3, collate_fn=collate_images))
    got = list(threaded_batches(files, 3, threads=2, collate=collate_images))
    assert len(got) == len(ref) == 3
    for (i1, p1, e1), (i2, p2, e2) in zip(got, ref):
        assert i1 == i2 and [i for i, _ in e1] == [i for i, _ in e2]
        assert (p1 is None and p2 is None) or torch.equal(p1, p2)
    assert [i for i, _ in got[1][2]] == [3]
