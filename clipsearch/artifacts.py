"""The one place that knows every path under ARTIFACTS_DIR.

```
<root>/model.json                          the model the project built (identity), read by ingest
<root>/models/                             trained checkpoints
<root>/onnx/                               ONNX exports cached by the offline stages
<root>/splits/{train,val,test}.jsonl       evaluation splits (prepare)
<root>/validation_report.json              what prepare skipped
<root>/embeddings/<split>/                 a split's embeddings (embed, hubness)
<root>/indexes/<split>/                    a split's evaluation indexes (index)
<root>/hubness/                            the hubness correction chosen on val
<root>/results/                            recall, sweeps, fine-tuning reports and plots
<root>/collections/<name>/catalog.sqlite   a collection's items, captions, metadata and vectors
<root>/collections/<name>/index/           its FAISS snapshot (derived from the catalog)
<root>/collections/<name>/report.json      what its last ingest did and skipped
<root>/collections/<name>/media/           images the collection owns (content-addressed)
```
The app, the offline stages and the tests build paths through `ArtifactLayout`, never by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

COLLECTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_collection_name(name: str) -> str:
    """A collection name is a folder name: letters, digits, `_`, `.`, `-`, at most 64, no leading dot."""
    if not isinstance(name, str) or not COLLECTION_NAME.match(name):
        raise ValueError(f"collection name {name!r} must be 1-64 letters, digits, '_', '.' or '-', "
                         "starting with a letter or digit")
    return name


@dataclass(frozen=True)
class CollectionLayout:
    name: str
    dir: Path

    @property
    def catalog(self) -> Path:
        return self.dir / "catalog.sqlite"

    @property
    def index_dir(self) -> Path:
        return self.dir / "index"

    @property
    def report(self) -> Path:
        return self.dir / "report.json"

    @property
    def media_dir(self) -> Path:
        return self.dir / "media"

    @property
    def watch_status(self) -> Path:
        """What a folder watcher (`offline watch`) says about itself: `clipsearch/watch_status.py`."""
        return self.dir / "watch.json"


@dataclass(frozen=True)
class ArtifactLayout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def model_record(self) -> Path:
        return self.root / "model.json"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def onnx_dir(self) -> Path:
        return self.root / "onnx"

    @property
    def splits_dir(self) -> Path:
        return self.root / "splits"

    def split_file(self, split: str) -> Path:
        return self.splits_dir / f"{split}.jsonl"

    @property
    def validation_report(self) -> Path:
        return self.root / "validation_report.json"

    def embeddings_dir(self, split: str) -> Path:
        return self.root / "embeddings" / split

    def indexes_dir(self, split: str) -> Path:
        return self.root / "indexes" / split

    @property
    def hubness_dir(self) -> Path:
        return self.root / "hubness"

    @property
    def results_dir(self) -> Path:
        return self.root / "results"

    @property
    def collections_dir(self) -> Path:
        return self.root / "collections"

    def collection(self, name: str) -> CollectionLayout:
        return CollectionLayout(name, self.collections_dir / check_collection_name(name))

    def collection_names(self) -> list[str]:
        """Collections that have a catalog, sorted by name."""
        if not self.collections_dir.is_dir():
            return []
        return sorted(p.parent.name for p in self.collections_dir.glob("*/catalog.sqlite")
                      if COLLECTION_NAME.match(p.parent.name))
