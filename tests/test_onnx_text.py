import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from clipsearch.encoder import ClipEncoder  # noqa: E402
from clipsearch.models import load_model  # noqa: E402
from clipsearch.onnx.runtime import OnnxTowerEncoder as OnnxTextEncoder  # noqa: E402
from clipsearch.onnx.runtime import cache_key  # noqa: E402
from clipsearch.onnx.text import build_onnx_text, maybe_onnx_text, text_tower_kind  # noqa: E402

QUERIES = ["a dog", "two children play football in a park near a red house", "", "🙂 émoji ünïcode",
           "a man in a red shirt climbs a rock wall while another man in a blue helmet belays him "
           "from below on a sunny day in the mountains near a lake"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model("test-tiny-vit", None, "cpu")


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def tiny_onnx(tiny, onnx_dir) -> OnnxTextEncoder:
    return build_onnx_text(tiny, onnx_dir, threads=1)


def full_path(loaded, texts):
    tokens = loaded.tokenizer(texts)
    assert tokens.shape[1] == 77
    with torch.inference_mode():
        return torch.nn.functional.normalize(loaded.model.encode_text(tokens).float(), dim=-1).numpy()


@pytest.mark.parametrize("rows", [[0], [1], [4], [0, 1], [2, 3, 0], [0, 1, 2, 3, 4]])
def test_equals_full_77_token_path(tiny, tiny_onnx, rows):
    texts = [QUERIES[i] for i in rows]
    out = tiny_onnx.encode_tokens(tiny.tokenizer(texts))
    ref = full_path(tiny, texts)
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert (out * ref).sum(1).min() >= 0.9999
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_every_variant_equals_full_path(tiny, onnx_dir):
    """Both export variants, fused or not, must give the same embedding."""
    ref = full_path(tiny, QUERIES)
    for variant in ("attention", "plain"):
        for fuse in (True, False):
            enc = build_onnx_text(tiny, onnx_dir, threads=1, fuse=fuse, variants=(variant,))
            assert f".{variant}." in enc.path.name
            assert (".fused" in enc.path.name) == fuse
            assert (enc.encode_tokens(tiny.tokenizer(QUERIES)) * ref).sum(1).min() >= 0.9999


def test_padding_and_array_inputs(tiny, tiny_onnx):
    tokens = tiny.tokenizer(QUERIES[:2])
    a = tiny_onnx.encode_tokens(tokens)
    b = tiny_onnx.encode_tokens(tokens[:, :20].numpy())  # already truncated, numpy in
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert tiny_onnx.encode_tokens(torch.zeros(0, 77, dtype=torch.long)).shape == (0, 32)
    with pytest.raises(ValueError):
        tiny_onnx.encode_tokens(np.zeros(5, dtype=np.int64))


def test_cache_is_reused_and_keyed_by_weights(tiny, onnx_dir, tiny_onnx):
    mtime = tiny_onnx.path.stat().st_mtime_ns
    again = build_onnx_text(tiny, onnx_dir, threads=1)
    assert again.path == tiny_onnx.path and again.path.stat().st_mtime_ns == mtime
    torch.manual_seed(1)
    other = load_model("test-tiny-vit", None, "cpu")  # same identity, different random weights
    assert cache_key(other) != cache_key(tiny)


def test_matches_torch_clip_encoder(tiny, tiny_onnx):
    torch_fast = ClipEncoder(tiny, fast_text=True).encode_texts(QUERIES)
    out = tiny_onnx.encode_tokens(tiny.tokenizer(QUERIES))
    np.testing.assert_allclose(out, torch_fast, atol=1e-5)


def test_no_exportable_text_tower_returns_none(tmp_path, caplog):
    custom = SimpleNamespace(model=torch.nn.Module(), identity=SimpleNamespace(model="some-custom-text"),
                             device=torch.device("cpu"))
    custom.model.text = torch.nn.Linear(2, 2)  # a CustomTextCLIP tower that is neither CLIP nor HF
    with caplog.at_level(logging.INFO, logger="clipsearch.onnx_text"):
        assert maybe_onnx_text(custom, tmp_path, threads=1) is None
    assert "no exportable text tower" in caplog.text
    assert not list(tmp_path.iterdir())


def test_export_failure_returns_none(tiny, tmp_path, monkeypatch, caplog):
    import clipsearch.onnx.text as ot

    def boom(*a, **k):
        raise RuntimeError("exporter broke")

    monkeypatch.setattr(ot, "export_text_tower", boom)
    with caplog.at_level(logging.WARNING, logger="clipsearch.onnx_text"):
        assert maybe_onnx_text(tiny, tmp_path, threads=1) is None
    assert "exporter broke" in caplog.text


# ---- lit-effnet-minilm: the Hugging Face (all-MiniLM-L6-v2, mean pooling) text tower -------------
# (`lit_loaded`, `lit_onnx_dir` and `lit_artifacts` come from tests/conftest.py)

LIT_CAPTIONS = [*QUERIES, "A DOG RUNS."]  # mixed lengths: 1 to ~40 word pieces, one empty


@pytest.fixture(scope="module")
def lit(lit_loaded):
    return lit_loaded


@pytest.fixture(scope="module")
def lit_onnx(lit, lit_onnx_dir) -> OnnxTextEncoder:
    enc = maybe_onnx_text(lit, lit_onnx_dir, threads=1)
    assert enc is not None, "lit-effnet-minilm's HF text tower must export"
    return enc


def test_lit_hf_tower_is_exported(lit, lit_onnx):
    assert text_tower_kind(lit.model) == "hf"
    assert lit_onnx.pad_id == lit.model.text.config.pad_token_id == 0
    assert lit_onnx.path.name.endswith(".onnx") and lit_onnx.self_check_cos >= 0.9999
    assert lit_onnx.dim == 256


def test_lit_onnx_equals_full_padded_encode_text(lit, lit_onnx):
    """Mixed-length captions: the ONNX graph on the truncated batch equals torch on the full 64."""
    tokens = lit.tokenizer(LIT_CAPTIONS)
    assert tokens.shape == (len(LIT_CAPTIONS), 64) and (tokens == 0).any()
    with torch.inference_mode():
        ref = lit.model.encode_text(tokens, normalize=True).float().numpy()
    for rows in (slice(None), slice(0, 1), slice(2, 4)):  # batch 1 runs unpadded after truncation
        out = lit_onnx.encode_tokens(tokens[rows])
        assert out.dtype == np.float32 and out.shape == ref[rows].shape
        assert (out * ref[rows]).sum(1).min() >= 0.9999
        np.testing.assert_allclose(out, ref[rows], atol=1e-4)
    # the graph masks padding itself: feeding the full padded length gives the same rows
    (full,) = lit_onnx.session.run(["embedding"], {"tokens": tokens.numpy()})
    np.testing.assert_allclose(full, ref, atol=1e-4)


def test_every_lit_variant_equals_full_padded_encode_text(lit, lit_onnx_dir):
    """Both HF export variants (sdpa, eager), fused or not, give torch's embedding."""
    tokens = lit.tokenizer(LIT_CAPTIONS)
    with torch.inference_mode():
        ref = lit.model.encode_text(tokens, normalize=True).float().numpy()
    attn = lit.model.text.transformer.config._attn_implementation
    for variant in ("sdpa", "eager"):
        for fuse in (True, False):
            enc = build_onnx_text(lit, lit_onnx_dir, threads=1, fuse=fuse, variants=(variant,))
            assert f".{variant}." in enc.path.name and (".fused" in enc.path.name) == fuse
            assert (enc.encode_tokens(tokens) * ref).sum(1).min() >= 0.9999
    assert lit.model.text.transformer.config._attn_implementation == attn  # restored after tracing


def test_lit_encoder_uses_onnx_and_matches_torch(lit, lit_onnx):
    onnx_enc = ClipEncoder(lit, text_backend=lit_onnx)
    torch_full = ClipEncoder(lit, fast_text=False).encode_texts(LIT_CAPTIONS)
    out = onnx_enc.encode_texts(LIT_CAPTIONS)
    assert (out * torch_full).sum(1).min() >= 0.9999
    assert isinstance(onnx_enc.text_backend, OnnxTextEncoder)


def test_lit_export_is_cached(lit, lit_onnx_dir, lit_onnx):
    mtime = lit_onnx.path.stat().st_mtime_ns
    again = build_onnx_text(lit, lit_onnx_dir, threads=1)
    assert again.path == lit_onnx.path and again.path.stat().st_mtime_ns == mtime


def test_service_picks_onnx_text_for_lit(lit, lit_onnx, lit_onnx_dir, lit_artifacts, monkeypatch):
    """`load_resources` with the default CLIPSEARCH_TEXT_BACKEND=onnx serves lit-effnet-minilm's
    text queries through ONNX Runtime (the model load is stubbed with the session's loaded model)."""
    import app.resources as resources
    from app.config import Settings

    monkeypatch.setattr(resources, "load_model", lambda *a, **k: lit)
    settings = Settings(artifacts_dir=lit_artifacts, onnx_cache_dir=lit_onnx_dir, torch_threads=1,
                        device="cpu", image_backend="torch")
    assert settings.text_backend == "onnx"
    res = resources.load_resources(settings)
    backend = res.encoder.text_backend
    assert isinstance(backend, OnnxTextEncoder) and backend.path == lit_onnx.path
    ref = ClipEncoder(lit, fast_text=False).encode_texts(LIT_CAPTIONS[:2])
    assert (res.encoder.encode_texts(LIT_CAPTIONS[:2]) * ref).sum(1).min() >= 0.9999
