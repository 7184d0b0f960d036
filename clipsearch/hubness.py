"""The hubness correction's arithmetic and its query banks, shared by the offline stages and the service.

In a shared embedding space some vectors are *hubs*: a generic caption ("a dog runs on the grass") sits
close to very many images, a generic image close to very many captions, and hubs crowd the top of many
result lists. CSLS (Conneau et al., 2018) and query-bank normalisation (Bogolin et al., 2022) penalise
each gallery vector by how close it is to typical *queries*:

    score(query q, gallery vector g) = cos(q, g) − β · r_g,
    r_g = mean cosine of g to its k nearest vectors in a query bank (queries of the other modality).

Two corrections, one per direction, each with its own bank from the train split (never the split being
searched or evaluated) and its own β and k, chosen on val by `offline/hubness.py`:
- image → caption: captions are the gallery, the bank is train *images*; each caption row carries
  `−β·r_c` (`captions.offset` in a catalog);
- text → image: images are the gallery, the bank is train *captions*; each image row carries `−β·r_i`.
The offsets live in the indexes as one extra vector column searched with a 1 (`clipsearch.store`), so
HNSW and exact search, the evaluation and the service all rank by the corrected score, and a query costs
what it did. What changes is the gallery side: every new caption or image needs its offset, which is
why the banks are artifacts of their own (`<root>/hubness/`), loaded by ingest and by the service for
uploads (`Banks`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from numpy.typing import NDArray

from clipsearch.artifacts import ArtifactLayout
from clipsearch.manifest import ArtifactError, read_json, sha256_file

log = logging.getLogger(__name__)

# which gallery a correction applies to -> the file of its query bank under <root>/hubness/
BANK_FILES = {"captions": "image_bank.npy", "images": "caption_bank.npy"}
# the record keys of each correction in hubness.json: image -> caption at the top level (its first
# format), text -> image under "text_to_image"
INFO_KEYS = ("beta", "k", "bank_split", "bank_count", "bank_sha256", "selected_on")


def hubness_dir(root: Path) -> Path:
    return ArtifactLayout(root).hubness_dir


def hubness_path(root: Path) -> Path:
    return hubness_dir(root) / "hubness.json"


def bank_similarity(vectors: NDArray[np.float32], bank: NDArray[np.float32], k: int = 10,
                    chunk: int = 2048) -> NDArray[np.float32]:
    """r_g: each vector's mean cosine to its k nearest bank vectors (exact; chunked)."""
    if len(bank) == 0:
        raise ValueError("the query bank is empty")
    k = min(int(k), len(bank))
    vectors = np.asarray(vectors, np.float32).reshape(-1, bank.shape[1])
    out = np.empty(len(vectors), dtype=np.float32)
    for start in range(0, len(vectors), chunk):
        sims = vectors[start:start + chunk] @ bank.T
        out[start:start + chunk] = np.partition(sims, -k, axis=1)[:, -k:].mean(axis=1)
    return out


def offsets_from_bank(vectors: NDArray[np.float32], bank: NDArray[np.float32], beta: float, k: int
                      ) -> NDArray[np.float32]:
    """The row offsets an index stores: −β · r_g."""
    if len(vectors) == 0:
        return np.zeros(0, np.float32)
    return (-float(beta) * bank_similarity(vectors, bank, k)).astype(np.float32)


@dataclass(frozen=True)
class Correction:
    """One direction's correction: its β and k, its bank, and what a catalog records about it."""

    gallery: str  # "captions" or "images"
    beta: float
    k: int
    bank: NDArray[np.float32]
    info: dict[str, Any]

    def offsets(self, vectors: NDArray[np.float32]) -> NDArray[np.float32]:
        return offsets_from_bank(vectors, self.bank, self.beta, self.k)


@dataclass(frozen=True)
class Banks:
    """The corrections that apply to vectors of one model: `captions` (image → caption) and `images`
    (text → image), each None when the stage chose β = 0, has not run, or ran for another model."""

    captions: Correction | None = None
    images: Correction | None = None

    def caption_offsets(self, vectors: NDArray[np.float32]) -> NDArray[np.float32]:
        n = len(vectors)
        return self.captions.offsets(vectors) if self.captions is not None and n else np.zeros(n, np.float32)

    def image_offsets(self, vectors: NDArray[np.float32]) -> NDArray[np.float32]:
        n = len(vectors)
        return self.images.offsets(vectors) if self.images is not None and n else np.zeros(n, np.float32)

    def matching(self, captions_info: Mapping[str, Any] | None, images_info: Mapping[str, Any] | None
                 ) -> "Banks":
        """Only the corrections a collection was built with (its recorded `hubness` / `hubness_images`):
        a new row of a collection without a correction gets none, so all its rows rank alike."""
        def same(c: Correction | None, info: Mapping[str, Any] | None) -> Correction | None:
            return c if c is not None and info is not None and dict(info) == c.info else None
        return Banks(same(self.captions, captions_info), same(self.images, images_info))

    @classmethod
    def load(cls, root: Path, model: Mapping[str, Any]) -> "Banks":
        """The corrections `<root>/hubness/` holds for `model` (a ModelIdentity dict); none that apply
        gives an empty Banks. A bank file that does not match its record raises ArtifactError."""
        path = hubness_path(root)
        if not path.is_file():
            return cls()
        rec = read_json(path)
        if dict(rec.get("model") or {}) != dict(model):
            log.warning("hubness: %s was chosen for another model; no correction applied (run the "
                        "hubness stage again)", path)
            return cls()
        caps = _correction(root, "captions", rec)
        imgs = _correction(root, "images", rec.get("text_to_image") or {})
        return cls(caps, imgs)


def correction_info(rec: Mapping[str, Any]) -> dict[str, Any]:
    """What a catalog or index manifest records about one correction (its keys in `INFO_KEYS`)."""
    return {k: rec.get(k) for k in INFO_KEYS}


def _correction(root: Path, gallery: str, rec: Mapping[str, Any]) -> Correction | None:
    if not rec or not rec.get("beta"):
        return None
    file = hubness_dir(root) / BANK_FILES[gallery]
    if file.is_file():
        if rec.get("bank_sha256") and sha256_file(file) != rec["bank_sha256"]:
            raise ArtifactError(f"{file} does not match {hubness_path(root)}; run the hubness stage again")
        bank = np.load(file)
    elif gallery == "captions" and rec.get("bank_embeddings_manifest_sha256"):
        bank = _legacy_image_bank(root, rec)  # a record from before the banks were files of their own
    else:
        raise ArtifactError(f"the hubness bank {file} is missing; run the hubness stage again")
    return Correction(gallery, float(rec["beta"]), int(rec["k"]), np.ascontiguousarray(bank, np.float32),
                      correction_info(rec))


def _legacy_image_bank(root: Path, rec: Mapping[str, Any]) -> NDArray[np.float32]:
    edir = ArtifactLayout(root).embeddings_dir(rec["bank_split"])
    if not (edir / "manifest.json").is_file() or not (edir / "images.npy").is_file():
        raise ArtifactError(f"the '{rec['bank_split']}' image embeddings (the hubness bank) are missing; run "
                            f"the hubness stage again")
    if sha256_file(edir / "manifest.json") != rec["bank_embeddings_manifest_sha256"]:
        raise ArtifactError(f"the '{rec['bank_split']}' image embeddings changed since the hubness stage "
                            f"chose beta; run it again")
    return np.load(edir / "images.npy")
