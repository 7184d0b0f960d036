"""`python -m offline ingest` and live uploads on one collection: a re-ingest of the folder removes
the files gone from it, never the items uploaded to the running service (media the collection owns),
and a service store open on the collection picks the ingest's commits up with `refresh()`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.artifacts import ArtifactLayout
from clipsearch.media import is_owned_media, store_media
from clipsearch.models import load_model
from clipsearch.store import FaissStore, NewItem
from offline.ingest import ingest


@pytest.fixture(scope="module")
def tiny_model():
    return load_model("test-tiny-vit", None, device="cpu")


def _photo(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(path)
    return path


def test_reingest_keeps_uploads_and_a_served_store_sees_it(tmp_path, tiny_model):
    src, out = tmp_path / "photos", tmp_path / "art"
    for i in range(4):
        _photo(src / f"img{i}.png", i)
    ingest(src, out, "photos", tiny_model, batch_size=4, image_backend="torch", text_backend="torch")
    layout = ArtifactLayout(out).collection("photos")

    served = FaissStore.open(layout, readonly=False)  # what the service holds, writes enabled
    data = _photo(tmp_path / "upload.png", 42).read_bytes()
    path, sha = store_media(layout.media_dir, data, ".png")
    rel = str(path.relative_to(out))
    assert is_owned_media(rel) and not is_owned_media(str(src / "img0.png"))
    vec = served.vector("img0.png") * -1  # any unit vector of the right size
    served.add([NewItem(sha, rel, vec, sha256=sha, size=len(data))])

    (src / "img3.png").unlink()  # gone from the folder: removed by the re-ingest
    _photo(src / "img9.png", 9)  # new in the folder: added
    ingest(src, out, "photos", tiny_model, batch_size=4, image_backend="torch", text_backend="torch")

    assert served.refresh() is True  # the ingest's commits, picked up without reopening
    assert sorted(served.ids()) == sorted(["img0.png", "img1.png", "img2.png", "img9.png", sha])
    assert served.get(sha).path == rel
    assert served.search(served.vector("img9.png"), 1)[0].image_id == "img9.png"
    served.close()
