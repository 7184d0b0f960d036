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
