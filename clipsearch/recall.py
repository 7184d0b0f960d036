"""Retrieval metrics with Flickr's many-to-one ground truth.

Text → image: each caption has exactly one relevant image. Image → text: an image is a hit at K if
any of its captions is in the top K. A query's rank is the 1-based position of its first relevant
item; Recall@K is the share of queries with rank ≤ K, in percent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import NDArray

KS = (1, 5, 10)


def exact_ranks(queries: np.ndarray, gallery: np.ndarray, relevant: Sequence[np.ndarray],
                chunk: int = 1024, gallery_offsets: np.ndarray | None = None) -> NDArray[np.float64]:
    """Rank of the best relevant gallery item for each query under inner-product scores (plus each
    gallery item's offset, when given).

    Rank = 1 + number of gallery items scoring strictly higher than the best relevant one.
    """
    ranks = np.empty(len(queries), dtype=np.float64)
    for start in range(0, len(queries), chunk):
        scores = queries[start:start + chunk] @ gallery.T
        if gallery_offsets is not None:
            scores = scores + gallery_offsets[None, :]
        for row, s in enumerate(scores):
            best = s[relevant[start + row]].max()
            ranks[start + row] = 1 + np.count_nonzero(s > best)
    return ranks


def topk_ranks(ranked_ids: np.ndarray, relevant: Sequence[np.ndarray]) -> NDArray[np.float64]:
    """Rank of the first relevant id in each row of a top-k result; inf when none is in the row."""
    ranks = np.full(len(ranked_ids), np.inf)
    for i, (row, rel) in enumerate(zip(ranked_ids, relevant)):
        hit = np.flatnonzero(np.isin(row, rel))
        if hit.size:
            ranks[i] = hit[0] + 1
    return ranks


def summarize(ranks: np.ndarray, prefix: str, ks: Sequence[int] = KS, full: bool = True) -> dict[str, float | None]:
    """Recall@K in percent, plus median and mean rank (mean only for a full ranking)."""
    out: dict[str, float | None] = {f"{prefix}_R@{k}": round(float(np.mean(ranks <= k) * 100), 2) for k in ks}
    med = float(np.median(ranks)) if len(ranks) else float("nan")
    out[f"{prefix}_median_rank"] = med if np.isfinite(med) else None
    out[f"{prefix}_mean_rank"] = round(float(np.mean(ranks)), 2) if full and len(ranks) else None
    return out


def caption_groups(text_to_image: np.ndarray, n_images: int) -> list[np.ndarray]:
    """For each image row, the caption rows that describe it."""
    order = np.argsort(text_to_image, kind="stable")
    bounds = np.searchsorted(text_to_image[order], np.arange(n_images + 1))
    return [order[bounds[i]:bounds[i + 1]] for i in range(n_images)]


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: np.ndarray,
                      ks: Sequence[int] = KS,
                      search_images: Callable[[np.ndarray, int], np.ndarray] | None = None,
                      search_texts: Callable[[np.ndarray, int], np.ndarray] | None = None,
                      topk: int = 100, text_offsets: np.ndarray | None = None,
                      image_offsets: np.ndarray | None = None) -> dict[str, float | None]:
    """Both directions. Exact when no search functions are given; otherwise through them (e.g. HNSW).

    `search_images(queries, k)` / `search_texts(queries, k)` return (n, k) row ids. `text_offsets`
    (exact search only): a score offset per caption for image → text, as in a caption index built
    with offsets (the hubness correction); `image_offsets` the same per image for text → image.
    """
    text_to_image = np.asarray(text_to_image, dtype=np.int64)
    if text_to_image.shape[0] != text_emb.shape[0]:
        raise ValueError("text_to_image must have one entry per caption")
    t2i_rel = [np.array([j]) for j in text_to_image]
    i2t_rel = caption_groups(text_to_image, image_emb.shape[0])
    if any(len(g) == 0 for g in i2t_rel):
        raise ValueError("every image needs at least one caption")
    if search_images is None or search_texts is None:
        img_off = None if image_offsets is None else np.asarray(image_offsets, dtype=np.float32)
        t2i = exact_ranks(text_emb, image_emb, t2i_rel, gallery_offsets=img_off)
        offsets = None if text_offsets is None else np.asarray(text_offsets, dtype=np.float32)
        i2t = exact_ranks(image_emb, text_emb, i2t_rel, gallery_offsets=offsets)
        full = True
    else:
        k = max(max(ks), min(topk, image_emb.shape[0]))
        t2i = topk_ranks(search_images(text_emb, min(k, image_emb.shape[0])), t2i_rel)
        i2t = topk_ranks(search_texts(image_emb, min(k, text_emb.shape[0])), i2t_rel)
        full = False
    return {**summarize(t2i, "text_to_image", ks, full), **summarize(i2t, "image_to_text", ks, full)}
