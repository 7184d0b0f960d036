"""One collection's write path: embedded items → their hubness offsets from the model's banks → the
`VectorStore`.

`offline ingest` (in bulk, a commit every few hundred items), the service's uploads and caption
replacements (one item at a time) and `offline migrate` (offsets already made, copied as they are)
all commit through `Collection`, so a row's offsets are computed in one place (`with_offsets`):
one product of the whole chunk with each bank, since per item a bank of 30,000 vectors would be read
once for every item.

Which banks: ingest gives its rows the corrections the project chose for the model now (and then
makes the older rows match, `offline/ingest.py`); a served collection takes only the corrections
it was built with (`Collection.served`), so a new row of a collection without one gets none and all
its rows rank alike.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from clipsearch.hubness import Banks
from clipsearch.manifest import ArtifactError
from clipsearch.store.base import VectorStore
from clipsearch.store.catalog import NewItem

log = logging.getLogger(__name__)


def load_banks(root: Path, model: Mapping[str, Any]) -> Banks:
    """The hubness corrections the project chose for `model` (a ModelIdentity dict) under ARTIFACTS_DIR
    `root`; none (logged) where a bank cannot be read: new rows then get no offsets, which only
    matters for collections built with a correction."""
    try:
        return Banks.load(root, {k: v for k, v in model.items() if k != "image_tta" or v})
    except (ArtifactError, OSError, ValueError) as exc:
        log.warning("hubness correction not applied: %s", exc)
        return Banks()


def split_rows(flat: NDArray[np.float32], sizes: Sequence[int | None]) -> list[NDArray[np.float32] | None]:
    """`flat` cut into consecutive pieces of `sizes` (None: no piece)."""
    out: list[NDArray[np.float32] | None] = []
    at = 0
    for n in sizes:
        if n is None:
            out.append(None)
        else:
            out.append(flat[at:at + n])
            at += n
    return out


class Collection:
    """`store` written through with `banks`' offsets."""

    def __init__(self, store: VectorStore, banks: Banks | None = None):
        self.store = store
        self.banks = banks or Banks()

    @classmethod
    def served(cls, store: VectorStore, banks: Banks) -> "Collection":
        """The collection as the service writes to it: only the corrections it was built with."""
        if banks.captions is None and banks.images is None:
            return cls(store, banks)
        return cls(store, banks.matching(store.hubness, store.hubness_images))

    # -- offsets ------------------------------------------------------------------------------------
    def caption_offsets(self, caption_vectors: Sequence[NDArray[np.float32] | None]
                        ) -> list[NDArray[np.float32] | None]:
        """Each item's caption offsets (None where it has no captions), in one product with the bank."""
        present = [cv for cv in caption_vectors if cv is not None]
        flat = self.banks.caption_offsets(np.concatenate(present)) if present else np.zeros(0, np.float32)
        return split_rows(flat, [None if cv is None else len(cv) for cv in caption_vectors])

    def with_offsets(self, items: Sequence[NewItem]) -> list[NewItem]:
        """`items` with the image and caption offsets of this collection's banks."""
        if not items:
            return []
        images = self.banks.image_offsets(np.stack([np.asarray(i.vector, np.float32).reshape(-1) for i in items]))
        captions = self.caption_offsets([i.caption_vectors if i.captions else None for i in items])
        return [dataclasses.replace(item, offset=float(o), caption_offsets=co)
                for item, o, co in zip(items, images, captions)]

    # -- writes -------------------------------------------------------------------------------------
    def add_embedded(self, items: Sequence[NewItem], *, keep_offsets: bool = False) -> None:
        """Commit embedded items (new, or replacing those of the same ids) with their offsets; with
        `keep_offsets`, the offsets they carry (a copy of rows another store already corrected)."""
        self.store.add(list(items) if keep_offsets else self.with_offsets(items))

    def replace_captions(self, image_id: str, captions: Sequence[str], vectors: NDArray[np.float32]) -> None:
        """New captions (and their vectors) for an existing item, with their offsets; the image stays."""
        vecs = np.asarray(vectors, np.float32)
        self.store.replace_captions(image_id, list(captions), vecs, self.banks.caption_offsets(vecs))


__all__ = ["Collection", "load_banks", "split_rows"]
