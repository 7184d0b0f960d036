"""Guards that stop a run with a `FinetuneError` saying what happened and what to change: a
non-finite loss, or val embeddings collapsing onto one direction."""

from __future__ import annotations

import numpy as np
import torch

from offline.finetune.config import FinetuneError

COLLAPSE_SAMPLE = 256


def mean_pairwise_cosine(emb: np.ndarray | torch.Tensor) -> float:
    """Mean cosine over distinct pairs of (already normalised) embeddings."""
    x = torch.as_tensor(emb, dtype=torch.float32)
    n = x.shape[0]
    if n < 2:
        return 0.0
    s = x.sum(0)
    return float(((s @ s) - (x * x).sum()) / (n * (n - 1)))


def collapse_stats(image_emb: np.ndarray, text_emb: np.ndarray) -> dict[str, float]:
    """Mean pairwise cosine of the first val images and captions (a fixed batch)."""
    return {"image_mean_cosine": round(mean_pairwise_cosine(image_emb[:COLLAPSE_SAMPLE]), 5),
            "text_mean_cosine": round(mean_pairwise_cosine(text_emb[:COLLAPSE_SAMPLE]), 5)}


def check_collapse(image_emb: np.ndarray, text_emb: np.ndarray, threshold: float, where: str,
                   start: dict[str, float] | None = None) -> dict[str, float]:
    """Stop when a val batch's mean pairwise cosine is near 1.

    "Near" is `threshold`, except for a model that already starts above it (a random init can sit at
    0.99): there the limit is halfway from its starting value to 1, so training that pulls the
    embeddings further together still stops, while the starting model does not count as collapsed.
    """
    stats = collapse_stats(image_emb, text_emb)
    if not all(np.isfinite(list(stats.values()))):
        raise FinetuneError(f"Embeddings became non-finite {where}; lower --lr/--head-lr.")
    for key, value in stats.items():
        limit = threshold if start is None else max(threshold, 1 - (1 - start[key]) / 2)
        if value > limit:
            raise FinetuneError(
                f"Embeddings collapsed {where}: mean pairwise cosine of a val batch is {value:.3f} "
                f"(image {stats['image_mean_cosine']:.3f}, text {stats['text_mean_cosine']:.3f}; "
                f"limit {limit:.3f}); lower --lr/--head-lr, raise --warmup-steps or lock more of "
                f"the towers.")
    return stats


def check_loss(loss: torch.Tensor, epoch: int, step: int) -> None:
    if not torch.isfinite(loss):
        raise FinetuneError(
            f"Loss became {float(loss.detach())} at epoch {epoch + 1}, step {step + 1}: training diverged; "
            f"lower --lr/--head-lr or raise --warmup-steps.")

