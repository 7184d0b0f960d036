"""Shared tiny fixtures: synthetic captioned images and a tiny open_clip model checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

# The slow tests (`pytest -m "not slow"`, `bash scripts/test.sh --quick`, leaves them out; CI runs them):
# whole files, and tests whose name says what they are. Marked here rather than in each file.
SLOW_FILES = (
    "tests/browser/",                  # headless Chromium
    "tests/app/test_app_fuzz.py",      # schemathesis fuzzing of every route
    "tests/app/test_app_crash.py",     # SIGKILL during writes and compactions
    "tests/app/test_app_loopback.py",  # real servers over loopback: soak, overload, SIGHUP swaps
    "tests/app/test_serve_cli.py",     # `clipsearch serve` as a real server, stopped with SIGTERM
    "tests/test_store_durability.py",  # SIGKILL against the stores
    "tests/test_lit_model.py",         # the offline model's towers, built and exported
    "tests/test_onnx_image.py",        # ONNX exports of the image towers
    "tests/test_bf16_image.py",        # bf16 copies of the image towers
    "tests/test_deploy.py",            # compose's build command: a whole build in a subprocess
)
SLOW_NAMES = re.compile(r"sigkill|killed|soak|fuzz|(^|_)lit(_|$)|mirror_features")


def pytest_collection_modifyitems(config, items):
    root = Path(__file__).resolve().parents[1]
    for item in items:
        rel = Path(str(item.fspath)).resolve().relative_to(root).as_posix()
        if rel.startswith(SLOW_FILES) or SLOW_NAMES.search(item.name):
            item.add_marker(pytest.mark.slow)


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
    """The smallest artifacts dir `app.resources.load_resources` accepts for lit-effnet-minilm: one
    collection of 3 images with a caption each, placeholder vectors (the tests look at the encoder)."""
    import numpy as np

    from clipsearch.artifacts import ArtifactLayout
    from clipsearch.store import Catalog, NewItem

    root = tmp_path_factory.mktemp("lit_artifacts")
    identity = lit_loaded.identity.to_dict()
    vecs = np.eye(3, identity["embed_dim"], dtype=np.float32)
    items = []
    for i, name in enumerate(("red", "green", "blue")):
        path = root / f"im{i}.png"
        make_image(COLORS[name], SHAPES[i % 2]).save(path)
        items.append(NewItem(f"im{i}", str(path), vecs[i], captions=(f"a {name} {SHAPES[i % 2]}",),
                             caption_vectors=vecs[i:i + 1]))
    with Catalog(ArtifactLayout(root).collection("lit").catalog) as catalog:
        catalog.set_model(identity, identity["embed_dim"])
        catalog.put(items)
    return root
