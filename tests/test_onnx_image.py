"""The ONNX Runtime image tower (lit-effnet-minilm's EfficientNet-Lite0; ViT towers on the tiny test
ViT): equal to torch, cached, self-checked, with torch as the fallback; picked by default in the
service and in `offline embed`."""

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


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    return load_model("test-tiny-vit", None, "cpu")


@pytest.fixture(scope="module")
def tiny_vit_onnx(tiny_vit, tmp_path_factory):
    return tmp_path_factory.mktemp("vit_onnx")


def _vit_pixels(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def test_vit_tower_exports_equal_to_torch_and_cached(tiny_vit, tiny_vit_onnx, caplog):
    """A ViT image tower (open_clip VisionTransformer) now runs on ONNX Runtime too: same embeddings
    as torch's encode_image, the first variant (fused Attention) preferred, reused from the cache."""
    with caplog.at_level(logging.INFO, logger="clipsearch.onnx_image"):
        enc = maybe_onnx_image(tiny_vit, tiny_vit_onnx, threads=1)
    assert enc is not None and enc.self_check_cos >= 0.9999
    assert enc.path.name == f"{cache_key(tiny_vit, tower='image')}.image.vit-attention.fused.onnx"
    pixels = _vit_pixels(5)
    with torch.inference_mode():
        ref = tiny_vit.model.encode_image(pixels, normalize=True).float().numpy()
    out = enc.encode_pixels(pixels)
    assert out.shape == (5, 32) and (out * ref).sum(1).min() >= 0.9999
    np.testing.assert_allclose(out, ref, atol=1e-4)
    np.testing.assert_allclose(enc.encode_pixels(pixels[:1]), out[:1], atol=1e-5)
    # the export twins are gone again: the torch model still has its own attention modules
    assert all(isinstance(b.attn, torch.nn.MultiheadAttention) for b in tiny_vit.model.visual.transformer.resblocks)
    mtime = enc.path.stat().st_mtime_ns
    again = build_onnx_image(tiny_vit, tiny_vit_onnx, threads=1)
    assert again.path == enc.path and again.path.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("variant,fuse", [("attention", False), ("plain", False), ("plain", True)])
def test_every_vit_variant_matches_torch(tiny_vit, tmp_path, variant, fuse):
    enc = build_onnx_image(tiny_vit, tmp_path, threads=1, fuse=fuse, variants=(variant,))
    assert f".vit-{variant}." in enc.path.name and enc.path.name.endswith(".fused.onnx") == fuse
    pixels = _vit_pixels(4)
    with torch.inference_mode():
        ref = tiny_vit.model.encode_image(pixels, normalize=True).float().numpy()
    assert (enc.encode_pixels(pixels) * ref).sum(1).min() >= 0.9999


def test_vit_wrong_graph_fails_every_variant_and_falls_back(tiny_vit, tmp_path, monkeypatch, caplog):
    real = oi._ImageTower.forward
    monkeypatch.setattr(oi._ImageTower, "forward", lambda self, x: -real(self, x))  # a broken export
    with caplog.at_level(logging.INFO, logger="clipsearch.onnx_image"):
        assert maybe_onnx_image(tiny_vit, tmp_path, threads=1) is None
    assert "disagrees with torch" in caplog.text
    for name in ("vit-attention.fused", "vit-attention", "vit-plain.fused", "vit-plain"):
        assert f"{name}.onnx rejected" in caplog.text
    assert all(isinstance(b.attn, torch.nn.MultiheadAttention) for b in tiny_vit.model.visual.transformer.resblocks)


def test_vit_export_failure_returns_none(tiny_vit, tmp_path, monkeypatch, caplog):
    def boom(*a, **k):
        raise RuntimeError("exporter broke")

    monkeypatch.setattr(oi, "export_module", boom)
    with caplog.at_level(logging.WARNING, logger="clipsearch.onnx_image"):
        assert maybe_onnx_image(tiny_vit, tmp_path, threads=1) is None
    assert "exporter broke" in caplog.text
    assert all(isinstance(b.attn, torch.nn.MultiheadAttention) for b in tiny_vit.model.visual.transformer.resblocks)


def test_unknown_image_tower_keeps_torch(tiny_vit, tmp_path, monkeypatch, caplog):
    """A tower the family does not name (open_clip's ModifiedResNet) is not exported."""
    monkeypatch.setattr(oi, "image_tower_kind", lambda model: None)
    with caplog.at_level(logging.INFO, logger="clipsearch.onnx_image"):
        assert maybe_onnx_image(tiny_vit, tmp_path, threads=1) is None
    assert "no exportable" in caplog.text
    assert not list(tmp_path.iterdir())


def test_vit_encoder_defaults_to_onnx(tiny_vit, tiny_vit_onnx):
    """build_encoder(image="onnx"), what the service and `offline embed` ask for by default, now
    gives the ViT tower an ONNX backend with torch's embeddings."""
    from clipsearch.encoder import build_encoder

    enc = build_encoder(tiny_vit, image="onnx", cache_dir=tiny_vit_onnx)
    assert isinstance(enc.image_backend, OnnxImageEncoder)
    ims = images(3)
    ref = ClipEncoder(tiny_vit).encode_images(ims)
    assert (enc.encode_images(ims) * ref).sum(1).min() >= 0.9999


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
    assert settings.image_backend == "auto" and settings.text_backend == "onnx"
    res = resources.load_resources(settings)  # auto: a timm tower (EfficientNet) goes to ONNX, never bf16
    assert isinstance(res.encoder.image_backend, OnnxImageEncoder)
    assert isinstance(res.encoder.text_backend, OnnxTextEncoder)
    assert res.encoder.image_backend.threads == settings.image_threads  # a lone image query: every core
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
    """`offline embed` (default image backend auto: onnx for a timm tower) encodes images through the ONNX tower, exported
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
