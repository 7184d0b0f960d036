"""Shared core of the retrieval engine: model loading, encoding, index wrapper, manifests, recall.

Both halves import from here: `offline/` (the pipeline CLI) and `app/` (the HTTP service).
"""

__version__ = "0.1.0"
