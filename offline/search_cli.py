"""`clipsearch search "text"`: answers in the terminal from a collection, without a server.

It opens the collection read-only, loads the model its vectors were embedded with (the same checks
as the service: name, checkpoint sha256, image TTA), embeds the query and ranks the images the way
`/search/text` does (cosine plus the collection's text → image hubness offset, when it has one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

HELP = "search a collection from the terminal, no server needed (rank, path, score)"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("search", help=HELP, description=HELP + ".")
    p.add_argument("query", help="what to look for, in words (e.g. \"a dog running on the beach\")")
    p.add_argument("-k", type=int, default=10, metavar="N", help="how many results (default: %(default)s)")
    p.add_argument("--collection", default=None, metavar="NAME",
                   help="which collection (default: $CLIPSEARCH_DEFAULT_COLLECTION, else the only or first one)")
    p.add_argument("--out", "--artifacts", dest="out", type=Path, default=None, metavar="DIR",
                   help="artifacts folder holding the collections (default: $ARTIFACTS_DIR, else ./artifacts)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: %(default)s)")
    return p


class SearchError(ValueError):
    """A search that cannot run; the message says what to do."""


def artifacts_dir(out: Path | None) -> Path:
    return Path(out or os.environ.get("ARTIFACTS_DIR") or "artifacts").expanduser()


def pick_collection(root: Path, wanted: str | None) -> str:
    from clipsearch.artifacts import ArtifactLayout

    names = ArtifactLayout(root).collection_names() if root.is_dir() else []
    wanted = wanted or os.environ.get("CLIPSEARCH_DEFAULT_COLLECTION") or None
    if not names:
        raise SearchError(f"no collection in {root}: make one with `clipsearch ingest FOLDER --out {root}` "
                          "(or `clipsearch serve FOLDER`), or point --out at your artifacts folder")
    if wanted is None:
        return names[0]
    if wanted not in names:
        raise SearchError(f"no collection {wanted!r} in {root}; there are: {', '.join(names)}")
    return wanted


def resolve_checkpoint(root: Path, pretrained: str | None) -> str | None:
    """The recorded checkpoint, else the file of that name under <artifacts>/models (a moved folder)."""
    from clipsearch.models import is_local_checkpoint

    if not pretrained or not is_local_checkpoint(pretrained):
        return pretrained
    recorded = Path(pretrained)
    for path in (recorded if recorded.is_absolute() else root / recorded, root / "models" / recorded.name):
        if path.is_file():
            return str(path)
    raise SearchError(f"checkpoint {recorded.name} is neither at {recorded} nor in {root / 'models'}; copy it there")


def load_encoder(root: Path, model: dict[str, Any], device: str):
    """The encoder of the model the collection was embedded with (torch: one query needs no export)."""
    from clipsearch.encoder import ClipEncoder
    from clipsearch.models import load_model

    loaded = load_model(model["model"], resolve_checkpoint(root, model.get("pretrained")), device,
                        checkpoint_sha256=model.get("checkpoint_sha256"), image_tta=model.get("image_tta"))
    return ClipEncoder(loaded)


def search(root: Path, collection: str, query: str, k: int, encoder=None, device: str = "cpu") -> list[dict[str, Any]]:
    """The top `k` images of `collection` for `query`: rank, image_id, path (absolute), score, captions.
    `encoder` (the encoder contract) stands in for the collection's model in tests."""
    from clipsearch.artifacts import ArtifactLayout
    from clipsearch.store import open_store

    if not query.strip():
        raise SearchError("the query is empty: say what to look for")
    if k < 1:
        raise SearchError(f"-k must be at least 1, got {k}")
    store = open_store(ArtifactLayout(root), collection, readonly=True)
    try:
        encoder = encoder or load_encoder(root, dict(store.model), device)
        vec = np.asarray(encoder.encode_texts([" ".join(query.split())]), dtype=np.float32)[0]
        hits = store.search(vec, k, target="images")
        results = []
        for rank, hit in enumerate(hits, 1):
            item = store.get(hit.image_id)
            path = Path(item.path) if item else Path(hit.image_id)
            if item and not path.is_absolute():  # media the collection owns live under ARTIFACTS_DIR
                path = root / path
            results.append({"rank": rank, "image_id": hit.image_id, "path": str(path),
                            "score": round(float(hit.score), 4),
                            "captions": list(item.captions) if item else []})
        return results
    finally:
        close = getattr(store, "close", None)
        if close:
            close()


def format_table(results: Sequence[dict[str, Any]]) -> str:
    if not results:
        return "no results"
    return "\n".join(f"{r['rank']:>3}  {r['path']}  {r['score']:.4f}" for r in results)


def run(args: argparse.Namespace, encoder=None) -> int:
    from clipsearch.manifest import ArtifactError
    from clipsearch.models import ModelLoadError
    from clipsearch.store import StoreError

    root = artifacts_dir(args.out)
    try:
        name = pick_collection(root, args.collection)
        results = search(root, name, args.query, args.k, encoder=encoder, device=args.device)
    except (SearchError, ArtifactError, ModelLoadError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"collection": name, "query": args.query, "results": results}, indent=2))
    else:
        print(format_table(results))
    return 0
