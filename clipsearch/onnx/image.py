"""The ONNX Runtime image tower for open_clip timm image towers (lit-effnet-minilm's EfficientNet-Lite0).

Eager PyTorch runs EfficientNet's depthwise convolutions slowly on a CPU; ONNX Runtime's kernels run
the same trunk several times faster (the fine-tuning feature cache measured ~4x on the frozen trunk
here). The exported graph is the whole image tower: pixels `[batch, 3, H, W]` (batch dynamic, H x W
the tower's input size) -> L2-normalised embedding, what `model.encode_image(pixels, normalize=True)`
gives.

Same rules as the text export (`clipsearch.onnx.runtime`): the file is `<cache_dir>/<key>.image.onnx`
with `cache_key(loaded, tower="image")`, written atomically; every session must match torch (cosine
>= 0.9999) on a few random pixel batches before it is used; `maybe_onnx_image` returns None (logged)
on any failure, so callers keep the torch path.

Only timm image towers (open_clip `TimmModel`, what the model's family calls "timm") are exported:
they are where the gain is measured; ViT towers keep torch. `onnx_module_runner` (from the runtime)
exports and runs any module with a batch axis; the fine-tuning feature cache runs its frozen trunk
through it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from clipsearch.families import family_of
from clipsearch.models import LoadedModel
from clipsearch.onnx.runtime import (INPUTS, OnnxTowerEncoder, cache_key, export_module, maybe_onnx,
                                     onnx_module_runner, self_check, tower_log)
from clipsearch.towers import image_size, l2_normalize

__all__ = ["build_onnx_image", "export_image_tower", "has_timm_image_tower", "maybe_onnx_image",
           "onnx_module_runner"]

log = tower_log("image")

INPUT = INPUTS["image"][0]


def has_timm_image_tower(model: torch.nn.Module) -> bool:
    """open_clip `TimmModel` image tower (`visual.trunk`), by the model's family: what this module exports."""
    return family_of(model).image_tower(model) == "timm"


class _ImageTower(torch.nn.Module):
    """pixels [B, 3, H, W] -> normalised embedding [B, D]; what gets exported."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.model.encode_image(pixels).float())


def export_image_tower(model: torch.nn.Module, path: str | os.PathLike[str]) -> Path:
    """Export the whole image tower (fp32, dynamic batch) to `path`, atomically."""
    path = Path(path)
    h, w = image_size(model)
    sample = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    export_module(_ImageTower(model).eval().float(), sample, path, input_name=INPUT)
    return path


def _check_pixels(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Random pixel batches (sizes 1 and 3) for the self-check against torch's `encode_image`."""
    h, w = image_size(model)
    g = torch.Generator().manual_seed(1)
    for n in (1, 3):
        yield torch.randn(n, 3, h, w, generator=g).clamp(-3, 3)


def build_onnx_image(loaded: LoadedModel, cache_dir: str | os.PathLike[str], threads: int = 1,
                     spinning: bool = False) -> OnnxTowerEncoder:
    """Export (or reuse the cached export of) the model's image tower, open a session, self-check."""
    model = loaded.model
    if not has_timm_image_tower(model):
        raise ValueError(f"{loaded.identity.model} has no timm image tower")
    if loaded.device.type != "cpu":
        raise ValueError("the ONNX image session is CPU-only")
    path = Path(cache_dir) / f"{cache_key(loaded, tower='image')}.image.onnx"
    if not path.is_file():
        t = time.perf_counter()
        export_image_tower(model, path)
        log.info("onnx image: exported %s in %.1fs", path.name, time.perf_counter() - t)
    enc = OnnxTowerEncoder(path, "image", threads=threads, spinning=spinning)
    enc.self_check_cos = self_check(enc, model.encode_image, _check_pixels(model))
    log.info("onnx image: using %s (min cosine vs torch %.6f)", path.name, enc.self_check_cos)
    return enc


def maybe_onnx_image(loaded: LoadedModel, cache_dir: str | os.PathLike[str], threads: int = 1,
                     spinning: bool = False) -> OnnxTowerEncoder | None:
    """An ONNX image encoder for `loaded`, or None (logged) when the model has no timm image tower,
    is not on the CPU, or export/loading/the equality self-check fails."""
    missing = None if has_timm_image_tower(loaded.model) else "has no timm image tower"
    return maybe_onnx("image", loaded, missing,
                      lambda: build_onnx_image(loaded, cache_dir, threads=threads, spinning=spinning))
