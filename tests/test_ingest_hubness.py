"""`offline ingest` and the hubness corrections and reuse: new rows get their offsets from the banks
when written, all rows are recomputed only when the correction changes, and the split embeddings a
build made are copied instead of embedded again (`offline/reuse.py`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.artifacts import ArtifactLayout
from clipsearch.hubness import BANK_FILES, Banks, hubness_dir, hubness_path
from clipsearch.manifest import save_npy_atomic, sha256_file, write_json_atomic
from clipsearch.models import load_model
from clipsearch.store import Catalog
from offline.ingest import ingest
from offline.reuse import KnownVectors


@pytest.fixture(scope="module")
def tiny_model():
    return load_model("test-tiny-vit", None, device="cpu")


def _photos(src: Path, seeds) -> list[Path]:
    src.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in seeds:
        rng = np.random.default_rng(s)
        p = src / f"img{s}.png"
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(p)
        (src / f"img{s}.txt").write_text(f"photo number {s}\nanother caption of {s}\n")
        paths.append(p)
    return paths


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _write_banks(root: Path, model: dict, dim: int, betas=(0.5, 0.4)) -> Banks:
    rng = np.random.default_rng(1)
    parts = {}
    for gallery, beta in zip(("captions", "images"), betas):
        save_npy_atomic(hubness_dir(root) / BANK_FILES[gallery], _unit(rng.normal(size=(15, dim))))
        parts[gallery] = {"beta": beta, "k": 3, "bank_split": "train", "bank_count": 15, "selected_on": "val",
                          "bank_sha256": sha256_file(hubness_dir(root) / BANK_FILES[gallery])}
    write_json_atomic(hubness_path(root), {**parts["captions"], "text_to_image": parts["images"], "model": model})
    return Banks.load(root, model)


def _run(src, out, loaded, **kw):
    return ingest(src, out, "photos", loaded, batch_size=4, image_backend="torch", text_backend="torch", **kw)


def _rows(out):
    with Catalog(ArtifactLayout(out).collection("photos").catalog, readonly=True) as cat:
        return cat.rows(), cat.hubness(), cat.hubness_images(), cat.head()[2]


def test_new_rows_get_offsets_and_only_a_new_correction_recomputes_all(tmp_path, tiny_model):
    out, src = tmp_path / "art", tmp_path / "photos"
    _photos(src, range(4))
    model = tiny_model.identity.to_dict()
    banks = _write_banks(out, model, tiny_model.identity.embed_dim)
    _run(src, out, tiny_model)
    rows, hub, hub_images, rebuild = _rows(out)
    assert hub == banks.captions.info and hub_images == banks.images.info
    np.testing.assert_allclose(rows.image_offsets, banks.image_offsets(rows.vectors), atol=1e-6)
    np.testing.assert_allclose(rows.caption_offsets, banks.caption_offsets(rows.caption_vectors), atol=1e-6)
    assert rows.image_offsets.min() < 0 and rows.caption_offsets.min() < 0

    # a new photo: its rows get their offsets when written; the others are not rewritten (no rebuild)
    _photos(src, [9])
    _run(src, out, tiny_model)
    rows2, _, _, rebuild2 = _rows(out)
    assert rebuild2 == rebuild and len(rows2.image_ids) == 5
    np.testing.assert_allclose(rows2.image_offsets, banks.image_offsets(rows2.vectors), atol=1e-6)
    np.testing.assert_allclose(rows2.caption_offsets, banks.caption_offsets(rows2.caption_vectors), atol=1e-6)

    # another beta: every row is recomputed (and the derived index must rebuild)
    banks3 = _write_banks(out, model, tiny_model.identity.embed_dim, betas=(0.2, 0.9))
    _run(src, out, tiny_model)
    rows3, hub3, hub_images3, rebuild3 = _rows(out)
    assert rebuild3 > rebuild2 and hub_images3["beta"] == 0.9 and hub3["beta"] == 0.2
    np.testing.assert_allclose(rows3.image_offsets, banks3.image_offsets(rows3.vectors), atol=1e-6)

    # the correction removed: the offsets go back to 0
    hubness_path(out).unlink()
    _run(src, out, tiny_model)
    rows4, hub4, hub_images4, _ = _rows(out)
    assert hub4 is None and hub_images4 is None
    assert not rows4.image_offsets.any() and not rows4.caption_offsets.any()


def test_known_vectors_are_copied_not_embedded(tmp_path, tiny_model, capsys):
    out, src = tmp_path / "art", tmp_path / "photos"
    paths = _photos(src, range(3))
    dim = tiny_model.identity.embed_dim
    marker = _unit(np.random.default_rng(5).normal(size=(2, dim)))
    later = time.time() + 60
    known = KnownVectors({os.path.realpath(paths[0]): (marker[0], later)}, {"photo number 1": marker[1]})
    summary = _run(src, out, tiny_model, known=known)
    assert summary["embedded"] == 3
    # the summary line tells copied vectors from encoded ones
    assert "(2 embedded, 1 reused, 0 removed" in capsys.readouterr().out
    rows, *_ = _rows(out)
    i = rows.image_ids.index(next(x for x in rows.image_ids if "img0" in x))
    np.testing.assert_array_equal(rows.vectors[i], marker[0])  # copied, not the model's vector
    j = rows.caption_texts.index("photo number 1")
    np.testing.assert_array_equal(rows.caption_vectors[j], marker[1])
    assert known.reused_images == 1 and known.reused_texts == 1
    # the rest was embedded by the model: an unknown caption's vector is the model's
    from clipsearch.encoder import ClipEncoder
    k = rows.caption_texts.index("photo number 2")
    np.testing.assert_allclose(rows.caption_vectors[k], ClipEncoder(tiny_model).encode_texts(["photo number 2"])[0],
                               atol=1e-5)


def test_a_file_changed_after_its_split_embedding_is_embedded_again(tmp_path, tiny_model):
    paths = _photos(tmp_path / "p", [0])
    v = _unit(np.ones((1, tiny_model.identity.embed_dim)))[0]
    known = KnownVectors({os.path.realpath(paths[0]): (v, time.time() - 3600)})  # embedded an hour ago
    assert known.image(paths[0]) is None  # the file is newer than that
    assert KnownVectors({os.path.realpath(paths[0]): (v, time.time() + 60)}).image(paths[0]) is not None


def test_from_splits_reads_only_the_same_models_embeddings(tmp_path, tiny_model):
    model = tiny_model.identity.to_dict()
    paths = _photos(tmp_path / "p", [0, 1])
    edir = tmp_path / "art" / "embeddings" / "train"
    vecs = _unit(np.random.default_rng(0).normal(size=(2, 8)))
    save_npy_atomic(edir / "images.npy", vecs)
    write_json_atomic(edir / "images.json", [{"image_id": p.name, "image_path": str(p)} for p in paths])
    save_npy_atomic(edir / "texts.npy", vecs[:1])
    write_json_atomic(edir / "texts.json", [{"caption_id": "a", "image_id": paths[0].name, "caption": "hello"}])
    write_json_atomic(edir / "manifest.json", {"model": model, "parts": {"images": "k", "texts": "k"}})
    known = KnownVectors.from_splits(tmp_path / "art", model)
    np.testing.assert_array_equal(known.image(paths[1]), vecs[1])
    np.testing.assert_array_equal(known.text("hello"), vecs[0])
    assert len(KnownVectors.from_splits(tmp_path / "art", {**model, "image_tta": "mirror"})) == 0
    (edir / "manifest.json").write_text(json.dumps({"model": model, "parts": {}}))
    assert len(KnownVectors.from_splits(tmp_path / "art", model)) == 0
