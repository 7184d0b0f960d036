"""What the training loop trains on: the splits, the batch plan of an epoch, and a backend that turns
a planned batch into embeddings.

Two backends compute the same thing: `PixelBackend` (here) runs any open_clip model on decoded,
augmented JPEGs; `FeatureBackend` (`offline.finetune.features`) runs only the trainable end of a
model whose family caches frozen-tower features. The loop needs nothing else from either (`Backend`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from clipsearch.models import LoadedModel
from offline.finetune.config import FinetuneError

# (image rows, caption rows) of one training batch
PlannedBatch = tuple[np.ndarray, np.ndarray]


# --------------------------------------------------------------------------------------------
# Splits: images, captions and which image each caption describes
# --------------------------------------------------------------------------------------------

@dataclass
class SplitData:
    """One split: unique images (sorted by id, as the embed stage orders them) and their captions."""

    name: str
    image_ids: list[str]
    image_paths: list[str]
    captions: list[str]
    text_to_image: np.ndarray          # (n_captions,) row of each caption's image
    groups: list[np.ndarray]           # caption rows of each image
    sha256: str                        # hash of the split file

    @property
    def n_images(self) -> int:
        return len(self.image_ids)


def read_split_data(out: Path, split: str) -> SplitData:
    from clipsearch.recall import caption_groups
    from offline.embed import split_records

    image_recs, text_recs, sha = split_records(out, split)
    row = {r["image_id"]: i for i, r in enumerate(image_recs)}
    t2i = np.array([row[r["image_id"]] for r in text_recs], dtype=np.int64)
    return SplitData(split, [r["image_id"] for r in image_recs], [r["image_path"] for r in image_recs],
                     [r["caption"] for r in text_recs], t2i, caption_groups(t2i, len(image_recs)), sha)


def epoch_batches(groups: Sequence[np.ndarray], epoch: int, seed: int,
                  batch_size: int) -> list[PlannedBatch]:
    """(image rows, caption rows) per batch: every image once per epoch with one freshly drawn caption.

    Deterministic in (seed, epoch), so a resumed run sees the same batches. The last batch is dropped
    when it is short and there are others: a tiny batch has too few negatives to be useful.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(groups))
    caps = np.array([groups[i][rng.integers(len(groups[i]))] for i in order], dtype=np.int64)
    batches = [(order[i:i + batch_size], caps[i:i + batch_size]) for i in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1][0]) < batch_size:
        batches.pop()
    return batches


# --------------------------------------------------------------------------------------------
# Backends: how a batch becomes embeddings
# --------------------------------------------------------------------------------------------

class Backend(Protocol):
    """How a stage's batches become embeddings (`PixelBackend`, `FeatureBackend`, or a test's fake)."""

    kind: str  # recorded as the stage's "backend" in the results: "pixels", "features"

    def inputs(self, batches: list[PlannedBatch]) -> Iterator[Any]:
        """The model inputs of each planned batch, in order."""
        ...

    def forward(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised (image, text) embeddings of one batch, with gradients."""
        ...

    def embed(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Normalised embeddings of every image and caption of a split (eval mode, no gradients)."""
        ...


class PixelBackend:
    """Any open_clip model, end to end on decoded, augmented pixels."""

    kind = "pixels"

    def __init__(self, loaded: LoadedModel, splits: dict[str, SplitData], workers: int, eval_batch: int):
        self.loaded = loaded
        self.model = loaded.model
        self.splits = splits
        self.workers = workers
        self.eval_batch = eval_batch
        self.device = loaded.device

    def inputs(self, batches: list[PlannedBatch]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(pixels, tokens) per planned batch, decoded and augmented in DataLoader workers."""
        from torch.utils.data import DataLoader

        dataset = _PairDataset(self.splits["train"], batches, self.loaded.preprocess_train, self.loaded.tokenizer)
        yield from DataLoader(dataset, batch_size=None, shuffle=False, num_workers=self.workers,
                              pin_memory=self.device.type == "cuda", prefetch_factor=2 if self.workers else None)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, tokens = (t.to(self.device, non_blocking=True) for t in batch)
        return (F.normalize(self.model.encode_image(pixels), dim=-1),
                F.normalize(self.model.encode_text(tokens), dim=-1))

    def embed(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        from offline.embed import embed_images, embed_texts

        data = self.splits[split]
        self.model.eval()
        images, kept, bad = embed_images(self.loaded, data.image_paths, self.eval_batch, self.workers,
                                         desc=f"{split} images")
        if bad:
            raise FinetuneError(f"{len(bad)} {split} images could not be decoded (first: {bad[0][1]}); "
                                "run prepare again.")
        return images, embed_texts(self.loaded, data.captions, self.eval_batch)


class _PairDataset(torch.utils.data.Dataset):
    """One item = one whole batch, so DataLoader workers decode batches in the planned order."""

    def __init__(self, split: SplitData, batches: list[PlannedBatch], preprocess: Any, tokenizer: Any):
        self.split, self.batches, self.preprocess, self.tokenizer = split, batches, preprocess, tokenizer

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from clipsearch.images import decode_image

        img_rows, cap_rows = self.batches[i]
        pixels = torch.stack([self.preprocess(decode_image(self.split.image_paths[r])) for r in img_rows])
        tokens = self.tokenizer([self.split.captions[c] for c in cap_rows])
        return pixels, tokens

