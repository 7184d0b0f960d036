"""The ONNX Runtime image tower (lit-effnet-minilm's EfficientNet-Lite0): equal to torch, cached,
self-checked, with torch as the fallback; picked by default in the service and in `offline embed`."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import clipsearch.onnx.image as oi  # noqa: E402
from clipsearch.encoder import ClipEncoder  # noqa: E402
from clipsearch.models import load_model  # noqa: E402
from clipsearch.onnx.image import build_onnx_image, maybe_onnx_image  # noqa: E402
from clipsearch.onnx.runtime import OnnxTowerEncoder as OnnxImageEncoder  # noqa: E402
from clipsearch.onnx.runtime import OnnxTowerEncoder as OnnxTextEncoder  # noqa: E402
from clipsearch.onnx.runtime import cache_key  # noqa: E402


def images(n: int) -> list[Image.Image]:
    out = []
    for i in range(n):
        im = Image.new("RGB", (120 + 17 * i, 90 + 9 * i), (30 * i % 255, 200 - 20 * i, 90))
        ImageDraw.Draw(im).ellipse((10, 10, 60 + 5 * i, 50), fill=(250, 240 - 30 * i, 10 * i))
        out.append(im)
    return out


@pytest.fixture(scope="module")
def lit(lit_loaded):
    return lit_loaded


@pytest.fixture(scope="module")
def lit_image(lit, lit_onnx_dir) -> OnnxImageEncoder:
    enc = maybe_onnx_image(lit, lit_onnx_dir, threads=1)
    assert enc is not None, "lit-effnet-minilm's timm image tower must export"
    return enc


def test_onnx_image_equals_torch_encode_image(lit, lit_image):
    pixels = torch.stack([lit.preprocess(im) for im in images(5)])
    with torch.inference_mode():
        ref = lit.model.encode_image(pixels, normalize=True).float().numpy()
    out = lit_image.encode_pixels(pixels)
    assert out.dtype == np.float32 and out.shape == (5, 256) and lit_image.dim == 256
    assert (out * ref).sum(1).min() >= 0.9999
    np.testing.assert_allclose(out, ref, atol=1e-4)
    np.testing.assert_allclose(lit_image.encode_pixels(pixels[:1]), out[:1], atol=1e-5)  # batch-independent
    assert lit_image.encode_pixels(torch.zeros(0, 3, 224, 224)).shape == (0, 256)
    with pytest.raises(ValueError):
        lit_image.encode_pixels(np.zeros((3, 224, 224), np.float32))


def test_encoder_with_image_backend_matches_torch(lit, lit_image):
    ims = images(3)
    a = ClipEncoder(lit, image_backend=lit_image, batch_size=2).encode_images(ims)
    b = ClipEncoder(lit, batch_size=2).encode_images(ims)
    assert (a * b).sum(1).min() >= 0.9999


def test_cached_and_keyed_apart_from_the_text_export(lit, lit_onnx_dir, lit_image):
    mtime = lit_image.path.stat().st_mtime_ns
    again = build_onnx_image(lit, lit_onnx_dir, threads=1)
    assert again.path == lit_image.path and again.path.stat().st_mtime_ns == mtime
    assert lit_image.path.name.startswith(cache_key(lit, tower="image"))
    assert cache_key(lit, tower="image") != cache_key(lit)
    assert lit_image.self_check_cos >= 0.9999


def test_wrong_graph_fails_the_self_check_and_falls_back(lit, tmp_path, monkeypatch, caplog):
    real = oi._ImageTower.forward
    monkeypatch.setattr(oi._ImageTower, "forward", lambda self, x: -real(self, x))  # a broken export
    with caplog.at_level(logging.WARNING, logger="clipsearch.onnx_image"):
        assert maybe_onnx_image(lit, tmp_path, threads=1) is None
    assert "disagrees with torch" in caplog.text


def test_export_failure_returns_none(lit, tmp_path, monkeypatch, caplog):
    def boom(*a, **k):
        raise RuntimeError("exporter broke")

    monkeypatch.setattr(oi, "export_image_tower", boom)
    with caplog.at_level(logging.WARNING, logger="clipsearch.onnx_image"):
        assert maybe_onnx_image(lit, tmp_path, threads=1) is None
    assert "exporter broke" in caplog.text


def test_vit_tower_keeps_torch(tmp_path, caplog):
    torch.manual_seed(0)
    tiny = load_model("test-tiny-vit", None, "cpu")
    with caplog.at_level(logging.INFO, logger="clipsearch.onnx_image"):
        assert maybe_onnx_image(tiny, tmp_path, threads=1) is None
    assert "no timm image tower" in caplog.text
    assert not list(tmp_path.iterdir())


def test_module_runner_runs_any_batch(lit):
    """The generic export + session helper (shared with the fine-tuning feature cache)."""
    stem = torch.nn.Sequential(lit.model.visual.trunk.conv_stem, lit.model.visual.trunk.bn1).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    run = oi.onnx_module_runner(stem, x, threads=1)
    y = torch.randn(5, 3, 64, 64)
    with torch.inference_mode():
        ref = stem(y)
    (out,) = run(y)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4)


def test_service_uses_onnx_for_both_towers_by_default(lit, lit_onnx_dir, lit_artifacts, monkeypatch):
    import app.resources as resources
    from app.config import Settings

    monkeypatch.setattr(resources, "load_model", lambda *a, **k: lit)
    settings = Settings(artifacts_dir=lit_artifacts, onnx_cache_dir=lit_onnx_dir, torch_threads=1, device="cpu")
    assert settings.image_backend == "onnx" and settings.text_backend == "onnx"
    res = resources.load_resources(settings)
    assert isinstance(res.encoder.image_backend, OnnxImageEncoder)
    assert isinstance(res.encoder.text_backend, OnnxTextEncoder)
    ims = images(2)
    ref = ClipEncoder(lit).encode_images(ims)
    assert (res.encoder.encode_images(ims) * ref).sum(1).min() >= 0.9999


def test_service_image_backend_torch_switch(lit, lit_onnx_dir, lit_artifacts, monkeypatch):
    import app.resources as resources
    from app.config import Settings

    monkeypatch.setattr(resources, "load_model", lambda *a, **k: lit)
    monkeypatch.setenv("CLIPSEARCH_IMAGE_BACKEND", "torch")
    settings = Settings(artifacts_dir=lit_artifacts, onnx_cache_dir=lit_onnx_dir, torch_threads=1,
                        device="cpu", text_backend="torch")
    assert settings.image_backend == "torch"
    res = resources.load_resources(settings)
    assert res.encoder.image_backend is None and res.encoder.text_backend is None


def test_offline_embed_uses_onnx_images(lit, tmp_path, monkeypatch):
    """`offline embed` (default image backend onnx) encodes images through the ONNX tower, exported
    into <out>/onnx, and gets what torch gets."""
    import json

    import offline.embed as embed_mod
    from clipsearch.images import decode_image

    seen = []
    real = embed_mod.embed_images

    def spy(*a, **k):
        seen.append(k.get("image_backend"))
        return real(*a, **k)

    monkeypatch.setattr(embed_mod, "embed_images", spy)
    (tmp_path / "splits").mkdir()
    rows = []
    for i, im in enumerate(images(3)):
        im.save(tmp_path / f"{i}.png")
        rows.append({"image_id": f"im{i}", "image_path": str(tmp_path / f"{i}.png"),
                     "caption_id": f"im{i}#0", "caption": f"picture number {i}"})
    (tmp_path / "splits" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    embed_mod.embed(tmp_path, "test", lit, batch_size=2, workers=0)
    assert len(seen) == 1 and isinstance(seen[0], OnnxImageEncoder)
    assert seen[0].path.parent == tmp_path / "onnx"
    vecs = np.load(tmp_path / "embeddings" / "test" / "images.npy")
    ref = ClipEncoder(lit).encode_images([decode_image(r["image_path"]) for r in rows])
    assert vecs.shape == (3, 256) and (vecs * ref).sum(1).min() >= 0.9999
    # captions go through the ONNX text tower too (default text backend), with torch's result
    texts = np.load(tmp_path / "embeddings" / "test" / "texts.npy")
    assert any(p.name.endswith(".onnx") and ".image." not in p.name for p in (tmp_path / "onnx").iterdir())
    tref = ClipEncoder(lit).encode_texts([r["caption"] for r in rows])
    assert texts.shape == (3, 256) and (texts * tref).sum(1).min() >= 0.9999
