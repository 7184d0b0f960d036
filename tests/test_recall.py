import itertools

import numpy as np
import pytest

from clipsearch.recall import caption_groups, exact_ranks, retrieval_metrics, summarize, topk_ranks


def brute_force(image_emb, text_emb, t2i, ks=(1, 5, 10)):
    """Independent reference: sort every score list in pure Python."""
    out = {}
    n_img = len(image_emb)
    t2i_hits = {k: 0 for k in ks}
    for q, gt in zip(text_emb, t2i):
        scores = [float(np.dot(q, g)) for g in image_emb]
        order = sorted(range(n_img), key=lambda j: -scores[j])
        for k in ks:
            t2i_hits[k] += gt in order[:k]
    i2t_hits = {k: 0 for k in ks}
    for j, q in enumerate(image_emb):
        scores = [float(np.dot(q, t)) for t in text_emb]
        order = sorted(range(len(text_emb)), key=lambda i: -scores[i])
        for k in ks:
            i2t_hits[k] += any(t2i[i] == j for i in order[:k])
    for k in ks:
        out[f"text_to_image_R@{k}"] = round(100 * t2i_hits[k] / len(text_emb), 2)
        out[f"image_to_text_R@{k}"] = round(100 * i2t_hits[k] / n_img, 2)
    return out


def test_hand_built_case():
    # 3 images on axes; captions pointing at known images
    images = np.eye(3, dtype=np.float32)
    texts = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 0, 1], [0, 1, 0.2], [0.6, 0.8, 0]], dtype=np.float32)
    t2i = np.array([0, 1, 2, 1, 1])
    m = retrieval_metrics(images, texts, t2i, ks=(1, 2))
    # caption ranks: c0->img0 rank1; c1->img1 rank2; c2->img2 rank1; c3->img1 rank1; c4->img1 rank1
    assert m["text_to_image_R@1"] == 80.0
    assert m["text_to_image_R@2"] == 100.0
    assert m["text_to_image_median_rank"] == 1.0
    assert m["text_to_image_mean_rank"] == 1.2
    # image 0 best caption is c0 (score 1) -> rank 1; image 1: captions c1,c3,c4 scores .1,1,.8;
    # best is c3 (1.0) -> rank 1; image 2: c2 (1.0) rank 1
    assert m["image_to_text_R@1"] == 100.0


def test_image_to_text_counts_any_of_the_captions():
    images = np.array([[1, 0], [0, 1]], dtype=np.float32)
    # image 0 has captions 0 and 1; caption 1 matches it best, caption 0 points elsewhere
    texts = np.array([[0, 1], [1, 0], [0, 1]], dtype=np.float32)
    t2i = np.array([0, 0, 1])
    m = retrieval_metrics(images, texts, t2i, ks=(1,))
    assert m["image_to_text_R@1"] == 100.0
    assert m["text_to_image_R@1"] == pytest.approx(200 / 3, abs=0.01)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_img, per = 30, 5
    images = rng.normal(size=(n_img, 8)).astype(np.float32)
    t2i = np.repeat(np.arange(n_img), per)
    texts = (images[t2i] + rng.normal(scale=1.0, size=(n_img * per, 8))).astype(np.float32)
    ours = retrieval_metrics(images, texts, t2i)
    ref = brute_force(images, texts, t2i)
    for key, value in ref.items():
        assert ours[key] == value, key


def test_search_function_path_equals_exact_when_search_is_exact():
    rng = np.random.default_rng(3)
    images = rng.normal(size=(20, 6)).astype(np.float32)
    t2i = np.repeat(np.arange(20), 2)
    texts = (images[t2i] + rng.normal(size=(40, 6))).astype(np.float32)

    def search(gallery):
        return lambda q, k: np.argsort(-(q @ gallery.T), axis=1)[:, :k]

    a = retrieval_metrics(images, texts, t2i)
    b = retrieval_metrics(images, texts, t2i, search_images=search(images), search_texts=search(texts))
    for key in a:
        if "R@" in key:
            assert a[key] == b[key]
    assert b["text_to_image_mean_rank"] is None  # a top-k list cannot give a mean rank


def test_topk_ranks_and_missing():
    ranks = topk_ranks(np.array([[3, 1, 2], [5, 6, 7]]), [np.array([2]), np.array([9])])
    assert ranks[0] == 3 and np.isinf(ranks[1])
    s = summarize(ranks, "x", ks=(1, 3))
    assert s["x_R@3"] == 50.0 and s["x_R@1"] == 0.0


def test_caption_groups_and_errors():
    groups = caption_groups(np.array([1, 0, 1, 2]), 3)
    assert [list(g) for g in groups] == [[1], [0, 2], [3]]
    with pytest.raises(ValueError):
        retrieval_metrics(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32)[:2], np.array([0, 1]))


def test_exact_ranks_ties_are_not_penalised():
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    g = np.array([[1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    assert exact_ranks(q, g, [np.array([1])])[0] == 1
