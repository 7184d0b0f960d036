"""A writable collection on disk served with the fake encoder: for the write and crash tests.

    python tests/app/serve_writable.py ARTIFACTS_DIR [--set NAME=VALUE ...]

Builds the collection `test` (the conftest dataset, embedded by the fake `ColorEncoder`) under
ARTIFACTS_DIR the first time, then serves it under uvicorn on 127.0.0.1 with writes enabled
(token `WRITE_TOKEN`), printing `PORT <n>` first. The service opens the catalog as it would a real
one (`app.resources.open_collections`); only the model is the fake. Not a test module.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

WRITE_TOKEN = "test-write-token-0123456789"
ADMIN_TOKEN = "test-admin-token-0123456789"  # compaction needs scope admin


def build_collection(artifacts: Path, name: str = "test") -> Path:
    """The conftest dataset as collection `name` under `artifacts` (once); returns the catalog path."""
    from PIL import Image

    from clipsearch.artifacts import ArtifactLayout
    from clipsearch.store import Catalog
    from conftest import FAKE_MODEL, ColorEncoder, _items, make_dataset

    layout = ArtifactLayout(artifacts).collection(name)
    if layout.catalog.is_file():
        return layout.catalog
    dataset = make_dataset(artifacts.parent / f"{name}-images")
    enc = ColorEncoder()
    img = enc.encode_images([Image.open(r["image_path"]) for r in dataset[0]])
    txt = enc.encode_texts([r["caption"] for r in dataset[1]])
    with Catalog(layout.catalog) as catalog:
        catalog.set_model(FAKE_MODEL, ColorEncoder.dim)
        catalog.put(_items(dataset, img, txt))
    return layout.catalog


def fake_loader(encoder: Any = None):
    """A `create_app(loader=...)` that opens the collections for real and pairs them with the fake encoder."""
    from conftest import ColorEncoder

    from app.resources import make_resources, open_collections

    def load(settings):
        stores, skipped, model, default = open_collections(settings)
        return make_resources(encoder or ColorEncoder(), list(stores.values()), model, default=default,
                              base_dir=settings.artifacts_dir, skipped=skipped)
    return load


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()

    import uvicorn

    from app.config import Settings
    from app.main import create_app

    build_collection(args.artifacts)
    values: dict[str, Any] = {"artifacts_dir": args.artifacts, "write_token": WRITE_TOKEN,
                              "admin_token": ADMIN_TOKEN, "torch_threads": 1,
                              "inference_threads": 2, "device": "cpu"}
    values.update(dict(item.split("=", 1) for item in args.set))
    app = create_app(Settings(**values), loader=fake_loader())
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30, backlog=256)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
