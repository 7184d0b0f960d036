"""ONNX Runtime image encoder for open_clip timm image towers (lit-effnet-minilm's EfficientNet-Lite0).

Eager PyTorch runs EfficientNet's depthwise convolutions slowly on a CPU; ONNX Runtime's kernels run
the same trunk several times faster (the fine-tuning feature cache measured ~4x on the frozen trunk
here). The exported graph is the whole image tower: pixels `[batch, 3, H, W]` (batch dynamic, H x W
the tower's input size) -> L2-normalised embedding, what `model.encode_image(pixels, normalize=True)`
gives.

Same rules as the text export (`clipsearch.onnx_text`, whose cache key and session options this
reuses): the file is `<cache_dir>/<key>.image.onnx` with `cache_key(loaded, tower="image")`, written
atomically; every session must match torch (cosine >= 0.9999) on a few random pixel batches before it
is used; `maybe_onnx_image` returns None (logged) on any failure, so callers keep the torch path.

`onnx_module_runner` is the generic part: export any module whose first input has a batch axis, open
a CPU session, run it (the fine-tuning feature cache can use it for its trunk front/back split).
Only timm image towers (open_clip `TimmModel`, `model.visual.trunk`) are exported here: they are
where the gain is measured; ViT towers keep torch.
"""

from __future__ import annotations

import io
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from numpy.typing import NDArray

from clipsearch.manifest import save_with
from clipsearch.models import LoadedModel
from clipsearch.onnx_text import OPSET, cache_key, session_options

log = logging.getLogger(__name__)

INPUT = "pixels"
OUTPUT = "embedding"
MIN_COS = 0.9999


def export_module(module: torch.nn.Module, example: torch.Tensor, target: str | os.PathLike[str] | io.BytesIO,
                  input_name: str = INPUT, output_names: list[str] | None = None) -> None:
    """Export `module(example)` with a dynamic batch axis (input and every output) to a file, written
    atomically, or into a BytesIO. TorchScript exporter: no onnxscript needed, simple dynamic axes."""
    module = module.eval()
    with torch.inference_mode():
        outs = module(example)
    n_out = len(outs) if isinstance(outs, (tuple, list)) else 1
    names = output_names or ([OUTPUT] if n_out == 1 else [f"out{i}" for i in range(n_out)])
    axes = {input_name: {0: "batch"}, **{n: {0: "batch"} for n in names}}

    def write(dst: Any) -> None:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # tracer notes on timm's static "same" padding arithmetic
            torch.onnx.export(module, (example,), dst if isinstance(dst, io.BytesIO) else str(dst),
                              input_names=[input_name], output_names=names, dynamic_axes=axes,
                              opset_version=OPSET, do_constant_folding=True, dynamo=False)

    if isinstance(target, io.BytesIO):
        write(target)
    else:
        save_with(Path(target), write)


def open_session(model: str | os.PathLike[str] | bytes, threads: int, spinning: bool = False) -> Any:
    """A CPU InferenceSession with the project's session options (see `onnx_text.session_options`)."""
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=session_options(threads, spinning),
                                providers=["CPUExecutionProvider"])


def onnx_module_runner(module: torch.nn.Module, example: torch.Tensor, threads: int | None = None,
                       path: str | os.PathLike[str] | None = None,
                       input_name: str = INPUT) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    """Export `module` (to `path` when given and missing, else in memory) and return
    `run(x) -> tuple of output tensors` on an ONNX Runtime CPU session. The caller checks the result
    against the module (this only exports and runs). `threads` defaults to torch's intra-op budget."""
    threads = threads or torch.get_num_threads()
    if path is None:
        buf = io.BytesIO()
        export_module(module, example, buf, input_name=input_name)
        session = open_session(buf.getvalue(), threads)
    else:
        if not Path(path).is_file():
            export_module(module, example, path, input_name=input_name)
        session = open_session(path, threads)

    def run(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return tuple(torch.from_numpy(o) for o in session.run(None, {input_name: arr}))

    return run


def has_timm_image_tower(model: torch.nn.Module) -> bool:
    """open_clip `TimmModel` image tower (`visual.trunk`): what this module exports."""
    visual = getattr(model, "visual", None)
    return isinstance(getattr(visual, "trunk", None), torch.nn.Module) and hasattr(model, "encode_image")


class _ImageTower(torch.nn.Module):
    """pixels [B, 3, H, W] -> normalised embedding [B, D]; what gets exported."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.model.encode_image(pixels).float()
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def image_size(model: torch.nn.Module) -> tuple[int, int]:
    size = getattr(model.visual, "image_size", 224)
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def export_image_tower(model: torch.nn.Module, path: str | os.PathLike[str]) -> Path:
    """Export the whole image tower (fp32, dynamic batch) to `path`, atomically."""
    path = Path(path)
    h, w = image_size(model)
    sample = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    export_module(_ImageTower(model).eval().float(), sample, path)
    return path


class OnnxImageEncoder:
    """Runs the exported tower: `encode_pixels(pixels) -> float32 (n, d)`, L2-normalised."""

    def __init__(self, path: str | os.PathLike[str], threads: int = 1, spinning: bool = False):
        self.path = Path(path)
        self.threads = threads
        self.session = open_session(self.path, threads, spinning)
        self.dim = int(self.session.get_outputs()[0].shape[-1])
        self.self_check_cos: float | None = None

    def encode_pixels(self, pixels: torch.Tensor | np.ndarray) -> NDArray[np.float32]:
        x = pixels.detach().cpu().numpy() if isinstance(pixels, torch.Tensor) else np.asarray(pixels)
        if x.ndim != 4:
            raise ValueError(f"expected pixels [batch, 3, H, W], got shape {x.shape}")
        if x.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        (out,) = self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(x, dtype=np.float32)})
        return np.ascontiguousarray(out, dtype=np.float32)


def _self_check(model: torch.nn.Module, enc: OnnxImageEncoder, min_cos: float = MIN_COS) -> float:
    """Cosine between the session and torch's `encode_image` on random pixel batches (sizes 1 and 3)."""
    h, w = image_size(model)
    g = torch.Generator().manual_seed(1)
    worst = 1.0
    for n in (1, 3):
        pixels = torch.randn(n, 3, h, w, generator=g).clamp(-3, 3)
        with torch.inference_mode():
            ref = torch.nn.functional.normalize(model.encode_image(pixels).float(), dim=-1).numpy()
        worst = min(worst, float((enc.encode_pixels(pixels) * ref).sum(1).min()))
    if worst < min_cos:
        raise RuntimeError(f"ONNX image tower disagrees with torch (min cosine {worst:.6f})")
    return worst


def build_onnx_image(loaded: LoadedModel, cache_dir: str | os.PathLike[str], threads: int = 1,
                     spinning: bool = False) -> OnnxImageEncoder:
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
    enc = OnnxImageEncoder(path, threads=threads, spinning=spinning)
    enc.self_check_cos = _self_check(model, enc)
    log.info("onnx image: using %s (min cosine vs torch %.6f)", path.name, enc.self_check_cos)
    return enc


def maybe_onnx_image(loaded: LoadedModel, cache_dir: str | os.PathLike[str], threads: int = 1,
                     spinning: bool = False) -> OnnxImageEncoder | None:
    """An ONNX image encoder for `loaded`, or None (logged) when the model has no timm image tower,
    is not on the CPU, or export/loading/the equality self-check fails."""
    if not has_timm_image_tower(loaded.model):
        log.info("onnx image: %s has no timm image tower; using the torch image path", loaded.identity.model)
        return None
    if loaded.device.type != "cpu":  # the session is CPU-only; on a GPU the torch path is faster
        log.info("onnx image: model is on %s; using the torch image path", loaded.device)
        return None
    try:
        return build_onnx_image(loaded, cache_dir, threads=threads, spinning=spinning)
    except Exception as exc:  # any export/runtime failure falls back to torch, with the reason logged
        log.warning("onnx image: export or load failed for %s (%s: %s); using the torch image path",
                    loaded.identity.model, type(exc).__name__, exc)
        return None
