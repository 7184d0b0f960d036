"""The ONNX Runtime image tower for open_clip timm image towers (lit-effnet-minilm's EfficientNet-Lite0)
and ViT image towers (open_clip `VisionTransformer`, ViT-B-32's).

Eager PyTorch runs EfficientNet's depthwise convolutions slowly on a CPU; ONNX Runtime's kernels run
the same trunk several times faster (the fine-tuning feature cache measured ~4x on the frozen trunk
here). A ViT tower at batch 1 is bound by per-op overhead, which ONNX Runtime removes; its attention
is exported through `clipsearch.onnx.vit` (variants, best first, each self-checked). The exported graph is the whole image tower: pixels `[batch, 3, H, W]` (batch dynamic, H x W
the tower's input size) -> L2-normalised embedding, what `model.encode_image(pixels, normalize=True)`
gives.

Same rules as the text export (`clipsearch.onnx.runtime`): the file is `<cache_dir>/<key>.image.onnx`
(timm) or `<cache_dir>/<key>.image.vit-<variant>[.fused].onnx` (ViT) with `cache_key(loaded, tower="image")`, written atomically; every session must match torch (cosine
>= 0.9999) on a few random pixel batches before it is used; `maybe_onnx_image` returns None (logged)
on any failure, so callers keep the torch path.

timm and ViT towers (what the model's family calls "timm" and "vit") are exported; other towers
(open_clip's ModifiedResNet) keep torch. `onnx_module_runner` (from the runtime)
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
from clipsearch.onnx.vit import VIT_VARIANTS, export_attention, vit_geometry
from clipsearch.towers import image_size, l2_normalize

__all__ = ["EXPORTABLE_IMAGE_TOWERS", "build_onnx_image", "check_pixels", "export_image_tower", "has_timm_image_tower",
           "image_tower_kind", "maybe_onnx_image", "onnx_module_runner"]

log = tower_log("image")

INPUT = INPUTS["image"][0]
EXPORTABLE_IMAGE_TOWERS = ("timm", "vit")


def image_tower_kind(model: torch.nn.Module) -> str | None:
    """"timm", "vit", or None when the model's image tower is not exported (its family says which)."""
    kind = family_of(model).image_tower(model)
    return kind if kind in EXPORTABLE_IMAGE_TOWERS else None


def has_timm_image_tower(model: torch.nn.Module) -> bool:
    """open_clip `TimmModel` image tower (`visual.trunk`), by the model's family."""
    return family_of(model).image_tower(model) == "timm"


class _ImageTower(torch.nn.Module):
    """pixels [B, 3, H, W] -> normalised embedding [B, D]; what gets exported."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.model.encode_image(pixels).float())


def export_image_tower(model: torch.nn.Module, path: str | os.PathLike[str], variant: str | None = None) -> Path:
    """Export the whole image tower (fp32, dynamic batch) to `path`, atomically. `variant`: for a
    ViT tower, how its attention is written (`clipsearch.onnx.vit.VIT_VARIANTS`; default the first)."""
    path = Path(path)
    h, w = image_size(model)
    sample = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    tower = _ImageTower(model).eval().float()
    if image_tower_kind(model) == "vit":
        with export_attention(model, variant or VIT_VARIANTS[0]):
            export_module(tower, sample, path, input_name=INPUT,
                          custom_opsets={"com.microsoft": 1} if (variant or VIT_VARIANTS[0]) == "attention" else None)
    else:
        export_module(tower, sample, path, input_name=INPUT)
    return path


def check_pixels(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Random pixel batches (sizes 1 and 3) for the self-check against torch's `encode_image`."""
    h, w = image_size(model)
    g = torch.Generator().manual_seed(1)
    for n in (1, 3):
        yield torch.randn(n, 3, h, w, generator=g).clamp(-3, 3)


def _fuse_vit(src: Path, dst: Path, heads: int, width: int) -> Path | None:
    """onnxruntime's transformer optimizer (model type `vit`) on an exported ViT tower, when available."""
    try:
        from onnxruntime.transformers import optimizer
    except Exception:  # optional: an onnxruntime without the transformers tools still works unfused
        return None
    from clipsearch.manifest import save_with

    try:
        opt = optimizer.optimize_model(str(src), model_type="vit", num_heads=heads, hidden_size=width,
                                       opt_level=0)
        save_with(dst, lambda p: opt.save_model_to_file(str(p)))
        return dst
    except Exception as exc:
        log.info("onnx image: transformer fusion skipped (%s: %s)", type(exc).__name__, exc)
        return None


def _candidates(loaded: LoadedModel, cache_dir: Path, kind: str, fuse: bool,
                variants: tuple[str, ...] | None) -> Iterator[tuple[Path, str | None, bool]]:
    """(file, ViT variant or None, fused) in preference order."""
    key = cache_key(loaded, tower="image")
    if kind != "vit":
        yield cache_dir / f"{key}.image.onnx", None, False
        return
    for variant in variants or VIT_VARIANTS:
        base = cache_dir / f"{key}.image.vit-{variant}.onnx"
        if fuse:
            yield cache_dir / f"{key}.image.vit-{variant}.fused.onnx", variant, True
        yield base, variant, False


def build_onnx_image(loaded: LoadedModel, cache_dir: str | os.PathLike[str], threads: int = 1,
                     spinning: bool = False, fuse: bool = True,
                     variants: tuple[str, ...] | None = None) -> OnnxTowerEncoder:
    """Export (or reuse the cached export of) the model's image tower, open a session, self-check.

    A timm tower has one file. A ViT tower tries its variants (`variants`, default
    `clipsearch.onnx.vit.VIT_VARIANTS`), each first through the transformer optimizer (`fuse`), then
    as exported; the first file that matches torch is used, one that does not is skipped."""
    model = loaded.model
    kind = image_tower_kind(model)
    if kind is None:
        raise ValueError(f"{loaded.identity.model} has no exportable (timm or ViT) image tower")
    if loaded.device.type != "cpu":
        raise ValueError("the ONNX image session is CPU-only")
    cache_dir = Path(cache_dir)
    errors: list[str] = []
    for path, variant, fused in _candidates(loaded, cache_dir, kind, fuse, variants):
        try:
            if not path.is_file():
                t = time.perf_counter()
                if fused:
                    base = path.with_name(path.name.replace(".fused.onnx", ".onnx"))
                    if not base.is_file():
                        export_image_tower(model, base, variant)
                    if _fuse_vit(base, path, *vit_geometry(model)) is None:
                        continue
                else:
                    export_image_tower(model, path, variant)
                log.info("onnx image: exported %s in %.1fs", path.name, time.perf_counter() - t)
            enc = OnnxTowerEncoder(path, "image", threads=threads, spinning=spinning)
            enc.self_check_cos = self_check(enc, model.encode_image, check_pixels(model))
        except Exception as exc:  # a graph that fails or changes the result is not served
            if kind != "vit":
                raise
            errors.append(f"{path.name}: {type(exc).__name__}: {exc}")
            log.info("onnx image: %s rejected (%s)", path.name, exc)
            continue
        log.info("onnx image: using %s (min cosine vs torch %.6f)", path.name, enc.self_check_cos)
        return enc
    raise RuntimeError("no ONNX image variant passed: " + "; ".join(errors))


def maybe_onnx_image(loaded: LoadedModel, cache_dir: str | os.PathLike[str], threads: int = 1,
                     spinning: bool = False) -> OnnxTowerEncoder | None:
    """An ONNX image encoder for `loaded`, or None (logged) when the model has neither a timm nor a
    ViT image tower, is not on the CPU, or export/loading/the equality self-check fails."""
    missing = None if image_tower_kind(loaded.model) else "has no exportable (timm or ViT) image tower"
    return maybe_onnx("image", loaded, missing,
                      lambda: build_onnx_image(loaded, cache_dir, threads=threads, spinning=spinning))
