"""Shared tiny fixtures: synthetic captioned images and a tiny open_clip model checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20),
          "purple": (140, 30, 160), "orange": (240, 140, 20)}
SHAPES = ("circle", "square")


def make_image(color: tuple[int, int, int], shape: str, size: int = 48) -> Image.Image:
    im = Image.new("RGB", (size, size), (245, 245, 245))
    d = ImageDraw.Draw(im)
    box = (size // 6, size // 6, size - size // 6, size - size // 6)
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=color)
    return im


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A generic-layout dataset: 12 images (6 colours x 2 shapes), 3 captions each, as a JSONL file."""
    root = tmp_path_factory.mktemp("tiny_data")
    (root / "img").mkdir()
    rows = []
    for name, rgb in COLORS.items():
        for shape in SHAPES:
            fname = f"img/{name}_{shape}.png"
            make_image(rgb, shape).save(root / fname)
            for k, tmpl in enumerate(("a {c} {s}", "one {c} {s} on white", "a picture of a {c} {s}")):
                rows.append({"image": fname, "caption": tmpl.format(c=name, s=shape)})
    path = root / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised tiny ViT (clipsearch's `test-tiny-vit` config) saved as a weights file."""
    import open_clip

    from clipsearch.models import register_configs

    register_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("test-tiny-vit", pretrained=None)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def lit_loaded():
    """lit-effnet-minilm with its packaged towers (random heads), loaded once per session (~10 s)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the towers come from installed packages, never a hub
    from clipsearch.models import load_model

    torch.manual_seed(0)
    return load_model("lit-effnet-minilm", None, "cpu")


@pytest.fixture(scope="session")
def lit_onnx_dir(tmp_path_factory) -> Path:
    """One ONNX cache folder for the lit-effnet-minilm exports of a session (each is exported once)."""
    return tmp_path_factory.mktemp("lit_onnx")


@pytest.fixture(scope="session")
def lit_artifacts(tmp_path_factory, lit_loaded) -> Path:
    """The smallest artifacts dir `app.resources.load_resources` accepts for lit-effnet-minilm:
    3 images, 3 captions, placeholder vectors (the tests look at the encoder, not at the hits)."""
    import numpy as np

    from clipsearch.index import IndexParams, VectorIndex
    from clipsearch.manifest import sha256_file, write_json_atomic

    root = tmp_path_factory.mktemp("lit_artifacts")
    identity = lit_loaded.identity.to_dict()
    images = [{"image_id": f"im{i}", "image_path": str(root / f"im{i}.png")} for i in range(3)]
    for i, name in enumerate(("red", "green", "blue")):
        make_image(COLORS[name], SHAPES[i % 2]).save(root / f"im{i}.png")
    texts = [{"caption_id": f"im{i}#0", "image_id": f"im{i}", "caption": f"a {name} {SHAPES[i % 2]}"}
             for i, name in enumerate(("red", "green", "blue"))]
    emb = root / "embeddings" / "test"
    write_json_atomic(emb / "images.json", images)
    write_json_atomic(emb / "texts.json", texts)
    write_json_atomic(emb / "manifest.json", {"model": identity, "split": "test"})
    sha = sha256_file(emb / "manifest.json")
    vecs = np.eye(3, identity["embed_dim"], dtype=np.float32)
    for name in ("images.hnsw", "texts.hnsw"):
        VectorIndex.build(vecs, IndexParams(), model=identity, split="test",
                          embeddings_manifest_sha256=sha).save(root / "indexes" / "test", name)
    return root
