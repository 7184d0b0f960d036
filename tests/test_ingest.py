"""`offline ingest`: tiny synthetic folders and record files made here, the real tiny open_clip model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.artifacts import ArtifactLayout
from clipsearch.models import load_model
from clipsearch.store import Catalog, FaissStore
from offline.cli import main
from offline.ingest import ingest
from offline.layouts import DataError
from offline.sources import read_source


@pytest.fixture(scope="module")
def tiny_model():
    return load_model("test-tiny-vit", None, device="cpu")


def _photo(path: Path, seed: int, size: tuple[int, int] = (40, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _store(out: Path, name: str) -> FaissStore:
    return FaissStore.open(ArtifactLayout(out).collection(name), readonly=True)


def _run(src: Path, out: Path, loaded, name: str = "photos", **kw):
    return ingest(src, out, name, loaded, batch_size=4, image_backend="torch", text_backend="torch", **kw)


def test_plain_folder_without_captions_nested(tmp_path, tiny_model):
    src = tmp_path / "photos"
    for i in range(6):
        _photo(src / ("2019" if i < 3 else "2020/summer") / f"img{i}.jpg", i)
    (src / ".hidden").mkdir()
    _photo(src / ".hidden" / "secret.jpg", 99)
    (src / "notes.md").write_text("not an image")
    res = _run(src, tmp_path / "art", tiny_model)
    assert res["images"] == 6 and res["captions"] == 0 and res["new"] == 6
    store = _store(tmp_path / "art", "photos")
    assert sorted(store.ids()) == sorted(f"{d}/img{i}.jpg" for i, d in
                                         enumerate(["2019"] * 3 + ["2020/summer"] * 3))
    item = store.get("2020/summer/img4.jpg")
    assert item.metadata["folder"] == "2020/summer" and item.metadata["file_time"].endswith("+00:00")
    assert item.captions == ()
    # image -> image: every item finds itself first
    for image_id in store.ids():
        assert store.search(store.vector(image_id), 1)[0].image_id == image_id


def test_text_session_only_built_when_there_are_captions(tmp_path, tiny_model, monkeypatch):
    """A caption-less folder never encodes a text, so ingest builds no text backend for it; a folder
    with sidecar captions does."""
    import clipsearch.encoder as ing  # build_encoder asks it for the text tower's backend

    asked = []
    monkeypatch.setattr(ing, "text_backend_for", lambda *a, **k: asked.append(a[1]))
    plain = tmp_path / "plain"
    for i in range(3):
        _photo(plain / f"p{i}.jpg", i)
    assert _run(plain, tmp_path / "art", tiny_model, name="plain")["images"] == 3
    assert asked == []
    captioned = tmp_path / "captioned"
    _photo(captioned / "c0.jpg", 7)
    (captioned / "c0.txt").write_text("a red square\n")
    assert _run(captioned, tmp_path / "art", tiny_model, name="captioned")["captions"] == 1
    assert asked == ["torch"]


def test_sidecar_captions_and_bad_files_reported(tmp_path, tiny_model):
    src = tmp_path / "photos"
    _photo(src / "a.jpg", 1)
    (src / "a.txt").write_text("a dog on a beach\n\n  two   spaces  \n")
    _photo(src / "b.png", 2)
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    res = _run(src, tmp_path / "art", tiny_model)
    assert (res["images"], res["captions"], res["skipped"]) == (2, 2, 1)
    store = _store(tmp_path / "art", "photos")
    assert store.get("a.jpg").captions == ("a dog on a beach", "two spaces")
    report = json.loads((tmp_path / "art/collections/photos/report.json").read_text())
    assert report["skipped"][0]["image_id"] == "broken.jpg" and report["skipped"][0]["reason"] == "corrupt_image"
    hits = store.search(store.vector("a.jpg"), 5, target="captions")
    assert {h.caption for h in hits} == {"a dog on a beach", "two spaces"}


def test_jsonl_records_with_extra_fields_and_caption_lists(tmp_path, tiny_model):
    src = tmp_path / "media"
    for i in range(3):
        _photo(src / f"p{i}.jpg", i)
    rows = [{"image": "p0.jpg", "caption": "first", "album": "trip", "year": 2019},
            {"image": "p0.jpg", "caption": "second"},
            {"image": "p1.jpg", "caption": ["one", "two"], "album": "home"},
            {"image": "p2.jpg", "album": "home"},
            {"image": "p9.jpg", "caption": "missing file"},
            "not an object"]
    file = src / "captions.jsonl"
    file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    res = _run(file, tmp_path / "art", tiny_model, name="media")
    assert res["images"] == 3 and res["captions"] == 4
    store = _store(tmp_path / "art", "media")
    assert store.get("p0.jpg").captions == ("first", "second")
    assert store.get("p0.jpg").metadata == {"album": "trip", "year": 2019}
    assert store.get("p2.jpg").captions == () and store.get("p2.jpg").metadata == {"album": "home"}
    reasons = sorted(s["reason"] for s in json.loads((tmp_path / "art/collections/media/report.json")
                                                     .read_text())["skipped"])
    assert reasons == ["malformed_record", "missing_image"]
    assert {h.image_id for h in store.search(store.vector("p1.jpg"), 3, filter={"album": "home"})} == {"p1.jpg", "p2.jpg"}


def test_reingest_embeds_only_what_changed(tmp_path, tiny_model, monkeypatch):
    src = tmp_path / "photos"
    for i in range(10):
        _photo(src / f"p{i}.jpg", i)
    out = tmp_path / "art"
    _run(src, out, tiny_model)
    before = {i: _store(out, "photos").vector(i) for i in _store(out, "photos").ids()}

    for i in range(10, 15):  # add 5
        _photo(src / f"p{i}.jpg", i)
    for i in (0, 1):  # change 2 (new pixels, same names)
        _photo(src / f"p{i}.jpg", 100 + i)
    for i in (7, 8, 9):  # remove 3
        (src / f"p{i}.jpg").unlink()
    os.utime(src / "p2.jpg", ns=(1, 1))  # touched only: same bytes, not re-embedded

    embedded: list[str] = []
    import offline.ingest as ing
    real = ing._new_item

    def spy(item, stat, vector, caption_vectors, *offsets):
        embedded.append(item.image_id)
        return real(item, stat, vector, caption_vectors, *offsets)

    monkeypatch.setattr(ing, "_new_item", spy)
    res = _run(src, out, tiny_model)
    assert sorted(embedded) == sorted([f"p{i}.jpg" for i in (0, 1, 10, 11, 12, 13, 14)])
    assert (res["new"], res["changed"], res["removed"], res["embedded"]) == (5, 2, 3, 7)
    store = _store(out, "photos")
    assert sorted(store.ids()) == sorted(f"p{i}.jpg" for i in [*range(7), *range(10, 15)])
    for i in (2, 3, 4, 5, 6):
        np.testing.assert_array_equal(store.vector(f"p{i}.jpg"), before[f"p{i}.jpg"])
    assert not np.allclose(store.vector("p0.jpg"), before["p0.jpg"])

    embedded.clear()
    res = _run(src, out, tiny_model)  # nothing changed
    assert embedded == [] and res["unchanged"] == 12


def test_new_captions_reembed_captions_only(tmp_path, tiny_model):
    src = tmp_path / "photos"
    _photo(src / "a.jpg", 1)
    out = tmp_path / "art"
    _run(src, out, tiny_model)
    vec = _store(out, "photos").vector("a.jpg")
    (src / "a.txt").write_text("now with a caption\n")
    res = _run(src, out, tiny_model)
    assert res["recaptioned"] == 1 and res["embedded"] == 0
    store = _store(out, "photos")
    assert store.get("a.jpg").captions == ("now with a caption",)
    np.testing.assert_array_equal(store.vector("a.jpg"), vec)


def test_interrupted_ingest_resumes_without_reembedding(tmp_path, tiny_model, monkeypatch):
    import offline.ingest as ing

    src = tmp_path / "photos"
    for i in range(9):
        _photo(src / f"p{i}.jpg", i)
    out = tmp_path / "art"
    monkeypatch.setattr(ing, "COMMIT_EVERY", 4)
    calls = {"n": 0}
    real_put = Catalog.put

    def put_then_die(self, items):
        calls["n"] += 1
        if calls["n"] == 3:  # the third commit never happens: Ctrl-C
            raise KeyboardInterrupt
        return real_put(self, items)

    monkeypatch.setattr(Catalog, "put", put_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(src, out, tiny_model)
    monkeypatch.setattr(Catalog, "put", real_put)
    with Catalog(ArtifactLayout(out).collection("photos").catalog, readonly=True) as cat:
        assert cat.count()[0] == 8  # two commits of 4 survived
    res = _run(src, out, tiny_model)
    assert (res["new"], res["unchanged"], res["images"]) == (1, 8, 9)


def test_empty_source_is_one_error_and_writes_nothing(tmp_path, tiny_model, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no photos here")
    with pytest.raises(DataError, match="no images found"):
        _run(empty, tmp_path / "art", tiny_model)
    assert ArtifactLayout(tmp_path / "art").collection_names() == []
    # only unreadable images: one error, no catalog left to serve
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="could be read"):
        _run(bad, tmp_path / "art", tiny_model)
    assert ArtifactLayout(tmp_path / "art").collection_names() == []
    # through the CLI: one error line on stderr, exit 2
    capsys.readouterr()
    code = main(["ingest", str(empty), "--out", str(tmp_path / "art"), "--model", "test-tiny-vit",
                 "--pretrained", "none", "--image-backend", "torch", "--text-backend", "torch"])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and err[-1].startswith("error: no images found")


def test_ingest_without_a_built_model_says_how(tmp_path, capsys):
    src = tmp_path / "photos"
    _photo(src / "a.jpg", 1)
    code = main(["ingest", str(src), "--out", str(tmp_path / "art")])
    err = capsys.readouterr().err
    assert code == 2 and "no model built yet" in err and "--model" in err


def test_other_model_needs_force(tmp_path, tiny_model):
    src = tmp_path / "photos"
    _photo(src / "a.jpg", 1)
    out = tmp_path / "art"
    _run(src, out, tiny_model)
    other = load_model("test-tiny-vit", None, device="cpu")
    other.identity = type(other.identity)(**{**other.identity.__dict__, "pretrained": "other"})
    with pytest.raises(DataError, match="--force"):
        _run(src, out, other)
    res = _run(src, out, other, force=True)
    assert res["new"] == 1


def test_flickr8k_layout_keeps_every_image_and_split(tmp_path):
    root = tmp_path / "flickr"
    for i in range(4):
        _photo(root / "Images" / f"{i}.jpg", i)
    (root / "Flickr8k.token.txt").write_text("0.jpg#0\ta cat\n0.jpg#1\ta small cat\n1.jpg#0\ta dog\n"
                                             "9.jpg#0\tno file\n2.jpg#0\t   \n")
    (root / "Flickr_8k.trainImages.txt").write_text("0.jpg\n1.jpg\n")
    (root / "Flickr_8k.devImages.txt").write_text("2.jpg\n")
    (root / "Flickr_8k.testImages.txt").write_text("3.jpg\n")
    src = read_source(root)
    assert src.kind == "flickr8k"
    by_id = {i.image_id: i for i in src.items}
    assert sorted(by_id) == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]  # 3.jpg has no caption: kept
    assert by_id["0.jpg"].captions == ("a cat", "a small cat") and by_id["0.jpg"].caption_ids == ("0.jpg#0", "0.jpg#1")
    assert [by_id[f"{i}.jpg"].metadata["split"] for i in range(4)] == ["train", "train", "val", "test"]
    assert {s["reason"] for s in src.skipped} == {"missing_image", "empty_caption"}
