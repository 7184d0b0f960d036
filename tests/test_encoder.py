import numpy as np
import pytest
import torch
from PIL import Image

from clipsearch.encoder import ClipEncoder
from clipsearch.models import load_model
from clipsearch.towers import truncate_tokens

QUERIES = ["a dog", "two children play football in a park near a red house", "", "🙂 émoji ünïcode"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model("test-tiny-vit", None, "cpu")


def test_truncate_tokens():
    t = torch.tensor([[5, 6, 0, 0, 0], [5, 6, 7, 0, 0]])
    assert truncate_tokens(t).shape == (2, 3)
    assert truncate_tokens(torch.zeros(2, 4, dtype=torch.long)).shape == (2, 1)


def test_fast_text_equals_full_77_token_path(tiny):
    fast = ClipEncoder(tiny, fast_text=True).encode_texts(QUERIES)
    tokens = tiny.tokenizer(QUERIES)
    assert tokens.shape[1] == 77
    with torch.inference_mode():
        full = torch.nn.functional.normalize(tiny.model.encode_text(tokens), dim=-1).numpy()
    cos = (fast * full).sum(1)
    assert cos.min() > 0.99999
    np.testing.assert_allclose(fast, full, atol=1e-5)


def test_fast_text_equals_full_path_vit_b32():
    """The real default architecture (random weights): truncation must not change the embedding."""
    torch.manual_seed(0)
    m = load_model("ViT-B-32", None, "cpu")
    fast = ClipEncoder(m, fast_text=True).encode_texts(QUERIES[:2])
    slow = ClipEncoder(m, fast_text=False).encode_texts(QUERIES[:2])
    assert (fast * slow).sum(1).min() > 0.9999


def test_outputs_are_normalized_float32_and_batched(tiny):
    enc = ClipEncoder(tiny, batch_size=3)
    t = enc.encode_texts(["x"] * 7)
    ims = [Image.new("RGB", (20 + i, 30), (i * 30, 0, 0)) for i in range(5)]
    v = enc.encode_images(ims)
    assert t.dtype == np.float32 and v.dtype == np.float32
    assert t.shape == (7, 32) and v.shape == (5, 32)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert enc.encode_texts([]).shape == (0, 32)
    # batch composition must not change a row's embedding
    np.testing.assert_allclose(enc.encode_images(ims[:1]), v[:1], atol=1e-5)


def test_onnx_text_backend_gives_the_same_embeddings(tiny, tmp_path):
    from clipsearch.onnx.text import maybe_onnx_text

    backend = maybe_onnx_text(tiny, tmp_path, threads=1)
    assert backend is not None
    a = ClipEncoder(tiny, text_backend=backend).encode_texts(QUERIES)
    b = ClipEncoder(tiny, fast_text=False).encode_texts(QUERIES)
    assert (a * b).sum(1).min() > 0.9999


def test_batches_of_texts_sorted_by_length_come_back_in_the_order_given(tiny):
    texts = [("word " * n).strip() or "x" for n in (9, 1, 30, 4, 4, 17, 2, 25, 6, 11)]
    enc = ClipEncoder(tiny, batch_size=3)
    one_by_one = np.concatenate([enc.encode_texts([t]) for t in texts])
    np.testing.assert_allclose(enc.encode_texts(texts), one_by_one, atol=1e-5)
    assert enc.encode_texts([]).shape == (0, enc.dim)
