"""The bf16 image tower (`clipsearch.bf16`): equal to fp32 torch within the self-check, rejected when it
is not, and chosen by "auto" only for a ViT tower on a CPU with AMX-BF16 (`tower_backend`)."""

import logging

import numpy as np
import pytest
import torch

import clipsearch.bf16 as bf
import clipsearch.encoder as enc_mod
from clipsearch.bf16 import Bf16ImageTower, build_bf16_image, maybe_bf16_image
from clipsearch.encoder import ClipEncoder, tower_backend
from clipsearch.models import load_model


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    return load_model("test-tiny-vit", None, "cpu")


def _pixels(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(11))


def test_bf16_tower_matches_fp32_and_leaves_the_model_fp32(tiny_vit):
    enc = build_bf16_image(tiny_vit, threads=1)
    assert enc.self_check_cos >= 0.9999
    pixels = _pixels(5)
    with torch.inference_mode():
        ref = tiny_vit.model.encode_image(pixels, normalize=True).float().numpy()
    out = enc.encode_pixels(pixels)
    assert out.dtype == np.float32 and out.shape == (5, 32)
    assert (out * ref).sum(1).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # the copy is bf16, the served fp32 model is untouched
    assert next(enc.visual.parameters()).dtype == torch.bfloat16
    assert next(tiny_vit.model.visual.parameters()).dtype == torch.float32
    with pytest.raises(ValueError):
        enc.encode_pixels(np.zeros((3, 32, 32), np.float32))


def test_encoder_with_bf16_backend_and_mirror(tiny_vit):
    ims = _pixels(3)
    plain = ClipEncoder(tiny_vit).encode_pixels(ims).numpy()
    fast = ClipEncoder(tiny_vit, image_backend=build_bf16_image(tiny_vit)).encode_pixels(ims).numpy()
    assert (plain * fast).sum(1).min() >= 0.9999


def test_a_tower_that_disagrees_is_rejected(tiny_vit, monkeypatch, caplog):
    real = Bf16ImageTower.encode

    def skewed(self, pixels):
        out = real(self, pixels)
        out[:, 0] += 0.5
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    monkeypatch.setattr(Bf16ImageTower, "encode", skewed)
    with pytest.raises(RuntimeError, match="bf16 image tower disagrees"):
        build_bf16_image(tiny_vit)
    with caplog.at_level(logging.WARNING, logger="clipsearch.bf16_image"):
        assert maybe_bf16_image(tiny_vit) is None
    assert "disagrees" in caplog.text


def test_a_rejected_bf16_tower_falls_back_to_onnx(tiny_vit, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(enc_mod, "maybe_bf16_image", lambda loaded, threads: None)
    backend = tower_backend(tiny_vit, "image", "bf16", tmp_path, 1)
    assert backend is not None and type(backend).__name__ == "OnnxTowerEncoder"


@pytest.mark.parametrize("amx", [True, False])
def test_auto_picks_bf16_only_for_a_vit_on_amx(tiny_vit, lit_loaded, tmp_path, monkeypatch, amx):
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(bf, "amx_bf16", lambda: amx)
    vit = tower_backend(tiny_vit, "image", "auto", tmp_path, 1)
    assert isinstance(vit, Bf16ImageTower) == amx
    if not amx:
        assert type(vit).__name__ == "OnnxTowerEncoder"
    # EfficientNet (a timm tower) is never put in bf16 by auto: its depthwise convolutions gain nothing
    lit = tower_backend(lit_loaded, "image", "auto", tmp_path, 1)
    assert type(lit).__name__ == "OnnxTowerEncoder"
    assert tower_backend(tiny_vit, "image", "torch", tmp_path, 1) is None


def test_bf16_is_for_the_cpu_only(tiny_vit, monkeypatch):
    monkeypatch.setattr(tiny_vit, "device", torch.device("meta"), raising=False)
    with pytest.raises(ValueError, match="CPU"):
        build_bf16_image(tiny_vit)


def test_efficientnet_in_bf16_fails_its_check_and_goes_to_onnx(lit_loaded, tmp_path):
    """The real EfficientNet-Lite0 weights lose too much in bf16 (cosine ~0.998 on this machine), so
    even a forced "bf16" serves the ONNX export."""
    pytest.importorskip("onnxruntime")
    assert maybe_bf16_image(lit_loaded) is None
    assert type(tower_backend(lit_loaded, "image", "bf16", tmp_path, 1)).__name__ == "OnnxTowerEncoder"


def test_concurrent_callers_share_the_towers_own_threads(tiny_vit):
    """Service worker threads call in at once; every forward runs on the tower's own threads
    (`cores // threads` of them) and each caller gets its own batch's embeddings."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    enc = build_bf16_image(tiny_vit, threads=1)
    batches = [_pixels(n) for n in (1, 2, 3, 4, 5, 6)]
    alone = [enc.encode_pixels(b) for b in batches]
    names: set[str] = set()
    real = enc._forward

    def spy(x):
        names.add(threading.current_thread().name)
        return real(x)

    enc._forward = spy
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(enc.encode_pixels, batches))
    for a, b in zip(alone, together):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert names and all(n.startswith("bf16-image") for n in names)
