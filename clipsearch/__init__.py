"""Shared core of the retrieval engine: model loading and encoding (`build_encoder`), the artifact
layout and manifests, collections (the ingest plan, `Collection`: the one write path) and their
stores (`VectorStore`), the index wrapper, hubness corrections, recall.

Both halves import from here: `offline/` (the pipeline CLI) and `app/` (the HTTP service).
"""

__version__ = "0.1.0"
