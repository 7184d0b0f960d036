"""Vectors a build already made, reused by `ingest` instead of embedding the same inputs twice.

`build` embeds the train, val and test splits (the hubness banks and the evaluation) and then ingests
the whole dataset as a collection: the same 8,091 images and 40,455 captions again. `KnownVectors`
hands ingest the split embeddings of the same model for the same image files (same resolved path, not
modified since the embeddings were written) and the same caption texts, so the collection costs a copy
instead of a second pass through both towers. Anything else is embedded as usual.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from clipsearch.artifacts import ArtifactLayout
from clipsearch.manifest import ArtifactError, read_json

log = logging.getLogger(__name__)


class KnownVectors:
    def __init__(self, images: Mapping[str, tuple[NDArray[np.float32], float]] | None = None,
                 texts: Mapping[str, NDArray[np.float32]] | None = None):
        self._images = dict(images or {})  # resolved path -> (vector, the embeddings' write time)
        self._texts = dict(texts or {})
        self.reused_images = 0
        self.reused_texts = 0

    def __len__(self) -> int:
        return len(self._images)

    @classmethod
    def from_splits(cls, root: Path, model: Mapping[str, Any],
                    splits: Sequence[str] = ("train", "val", "test")) -> "KnownVectors":
        """The split embeddings under `<root>/embeddings/` made by `model` (a ModelIdentity dict)."""
        images: dict[str, tuple[NDArray[np.float32], float]] = {}
        texts: dict[str, NDArray[np.float32]] = {}
        for split in splits:
            edir = ArtifactLayout(root).embeddings_dir(split)
            try:
                manifest = read_json(edir / "manifest.json")
            except (ArtifactError, OSError):
                continue
            if manifest.get("model") != dict(model) or "images" not in manifest.get("parts", {}):
                continue
            try:
                vecs = np.load(edir / "images.npy")
                recs = read_json(edir / "images.json")
                if len(vecs) == len(recs):
                    written = (edir / "images.npy").stat().st_mtime
                    for rec, v in zip(recs, vecs):
                        images[_key(rec["image_path"])] = (v, written)
                if "texts" in manifest["parts"] and (edir / "texts.npy").is_file():
                    tv = np.load(edir / "texts.npy")
                    trecs = read_json(edir / "texts.json")
                    if len(tv) == len(trecs):
                        texts.update((r["caption"], v) for r, v in zip(trecs, tv))
            except (ArtifactError, OSError, ValueError, KeyError) as exc:
                log.warning("reuse: the %s embeddings cannot be reused (%s); embedding instead", split, exc)
        return cls(images, texts)

    def image(self, path: str | Path) -> NDArray[np.float32] | None:
        """The vector of this image file, if a split embedded it and it has not changed since."""
        hit = self._images.get(_key(path))
        if hit is None:
            return None
        try:
            if os.stat(path).st_mtime > hit[1]:
                return None
        except OSError:
            return None
        self.reused_images += 1
        return hit[0]

    def text(self, caption: str) -> NDArray[np.float32] | None:
        v = self._texts.get(caption)
        if v is not None:
            self.reused_texts += 1
        return v


def _key(path: str | Path) -> str:
    return os.path.realpath(path)
