"""Ingest's memory bounds (issue 34): an ONNX image session runs a batch in slices of at most
`IMAGE_RUN_ROWS` rows (its arena keeps the largest run's activations), and an ingest that owns its
model frees the torch towers it does not run. Both must leave every vector as it was."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from clipsearch.artifacts import ArtifactLayout  # noqa: E402
from clipsearch.encoder import ClipEncoder, build_encoder  # noqa: E402
from clipsearch.models import load_model  # noqa: E402
from clipsearch.onnx.image import build_onnx_image  # noqa: E402
from clipsearch.onnx.runtime import IMAGE_RUN_ROWS, OnnxTowerEncoder, release_memory  # noqa: E402
from clipsearch.onnx.text import build_onnx_text  # noqa: E402
from clipsearch.store import FaissStore  # noqa: E402
from offline.ingest import ingest  # noqa: E402


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx_memory")


def _own(checkpoint: Path):
    """A model of this test's own (release changes it in place), the same weights every time."""
    return load_model("test-tiny-vit", str(checkpoint), "cpu")


def _photos(folder: Path, n: int, captions: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (30 + i, 40, 3), dtype=np.uint8)).save(folder / f"p{i}.jpg")
        if captions:
            (folder / f"p{i}.txt").write_text(f"photo number {i} of a red thing\n")
    return folder


class _Spy:
    """Delegates to a session and records the batch size of every run."""

    def __init__(self, session):
        self.session = session
        self.rows: list[int] = []

    def run(self, names, feeds):
        self.rows.append(len(next(iter(feeds.values()))))
        return self.session.run(names, feeds)

    def __getattr__(self, name):
        return getattr(self.session, name)


def test_image_session_runs_bounded_slices_with_the_same_result(tiny_checkpoint, onnx_dir):
    loaded = _own(tiny_checkpoint)
    enc = build_onnx_image(loaded, onnx_dir, threads=1)
    assert enc.max_rows == IMAGE_RUN_ROWS
    pixels = torch.randn(2 * IMAGE_RUN_ROWS + 3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    whole = OnnxTowerEncoder(enc.path, "image", max_rows=0)  # one run for the whole batch, as before
    enc.session = _Spy(enc.session)
    whole.session = _Spy(whole.session)
    sliced, ref = enc.encode_pixels(pixels), whole.encode_pixels(pixels)
    assert enc.session.rows == [IMAGE_RUN_ROWS, IMAGE_RUN_ROWS, 3] and whole.session.rows == [len(pixels)]
    assert sliced.dtype == np.float32 and sliced.shape == ref.shape and sliced.flags.c_contiguous
    np.testing.assert_allclose(sliced, ref, atol=1e-5)
    small = enc.encode_pixels(pixels[:2])  # a batch within the bound is one run
    assert enc.session.rows[-1] == 2
    np.testing.assert_allclose(small, ref[:2], atol=1e-5)
    with torch.inference_mode():
        torch_ref = torch.nn.functional.normalize(loaded.model.encode_image(pixels), dim=-1).numpy()
    assert (sliced * torch_ref).sum(1).min() >= 0.9999


def test_text_session_has_no_row_bound(tiny_checkpoint, onnx_dir):
    enc = build_onnx_text(_own(tiny_checkpoint), onnx_dir, threads=1)
    enc.session = _Spy(enc.session)
    enc.encode_tokens(torch.randint(1, 100, (3 * IMAGE_RUN_ROWS, 5)))
    assert enc.max_rows == 0 and enc.session.rows == [3 * IMAGE_RUN_ROWS]


def test_release_frees_the_torch_towers_and_keeps_the_vectors(tiny_checkpoint, onnx_dir):
    loaded = _own(tiny_checkpoint)
    enc = build_encoder(loaded, text="onnx", image="onnx", cache_dir=onnx_dir)
    texts = ["a dog on the grass", "two red squares", ""]
    images = [Image.new("RGB", (40 + 7 * i, 30), (40 * i, 200, 90)) for i in range(3)]
    before_t, before_i = enc.encode_texts(texts), enc.encode_images(images)
    assert enc.release_torch_towers(image=True, text=True) == ["image", "text"]
    assert enc.release_torch_towers(image=True, text=True) == []  # once
    assert all(p.is_meta for p in loaded.model.visual.parameters())
    text_params = [p for n, p in loaded.model.named_parameters() if n.startswith(("transformer.", "token_embedding."))]
    assert text_params and all(p.is_meta for p in text_params)
    release_memory()
    np.testing.assert_allclose(enc.encode_texts(texts), before_t, atol=1e-6)
    np.testing.assert_allclose(enc.encode_images(images), before_i, atol=1e-6)
    torch_only = ClipEncoder(loaded)  # another encoder of the same model knows, and says so
    with pytest.raises(RuntimeError, match="image tower .* was released"):
        torch_only.encode_images(images)
    with pytest.raises(RuntimeError, match="text tower .* was released"):
        torch_only.encode_texts(texts)


def _vectors(out: Path, name: str) -> dict[str, np.ndarray]:
    store = FaissStore.open(ArtifactLayout(out).collection(name), readonly=True)
    return {i: store.vector(i) for i in store.ids()}


def test_ingest_that_owns_its_model_frees_what_it_does_not_run(tmp_path, tiny_checkpoint):
    captioned = _photos(tmp_path / "captioned", 5, captions=True)
    kept, freed = _own(tiny_checkpoint), _own(tiny_checkpoint)
    kw = dict(batch_size=2, image_backend="onnx", text_backend="onnx")
    ingest(captioned, tmp_path / "a", "c", kept, **kw)
    ingest(captioned, tmp_path / "b", "c", freed, release_torch=True, **kw)
    assert not any(p.is_meta for p in kept.model.parameters())
    assert all(p.is_meta for p in freed.model.visual.parameters())
    assert all(p.is_meta for p in freed.model.transformer.parameters())
    a, b = _vectors(tmp_path / "a", "c"), _vectors(tmp_path / "b", "c")
    assert sorted(a) == sorted(b) and len(a) == 5
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6)
    # a plain folder on the torch image path: the image tower runs in torch and stays; no caption is
    # ever encoded, so the text tower goes
    plain = _photos(tmp_path / "plain", 3, captions=False)
    torch_image = _own(tiny_checkpoint)
    ingest(plain, tmp_path / "c", "p", torch_image, batch_size=2, image_backend="torch", text_backend="onnx",
           release_torch=True)
    assert not any(p.is_meta for p in torch_image.model.visual.parameters())
    assert all(p.is_meta for p in torch_image.model.transformer.parameters())
    assert len(_vectors(tmp_path / "c", "p")) == 3


def test_ingest_command_releases_only_a_model_it_loaded(tmp_path, monkeypatch):
    import offline.ingest as ing
    from offline.cli import main

    seen = []
    monkeypatch.setattr(ing, "ingest", lambda *a, **k: seen.append(k["release_torch"]) or {"images": 0})
    src = _photos(tmp_path / "photos", 1, captions=False)
    main(["ingest", str(src), "--out", str(tmp_path / "art"), "--collection", "x", "--model", "test-tiny-vit",
          "--pretrained", "none"])
    assert seen == [True]


def test_ingest_decodes_smaller_batches_than_embed_by_default():
    """Ingest's batch only sets how many images are decoded per step (the image session runs slices of
    IMAGE_RUN_ROWS): its default is smaller, the other stages keep theirs, and an explicit one wins."""
    from offline.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["ingest", "photos"]).batch_size == 32
    assert parser.parse_args(["ingest", "photos", "--batch-size", "64"]).batch_size == 64
    assert parser.parse_args(["embed"]).batch_size == 64
    assert IMAGE_RUN_ROWS <= 8
