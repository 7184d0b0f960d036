"""What the ONNX Runtime towers share: session options, the export call, the cache key, the self-check,
the one tower encoder class and the fall-back-to-torch policy.

Rules every exported tower follows (text: `clipsearch.onnx.text`, image: `clipsearch.onnx.image`):
- the graph ends in the L2-normalised embedding, output `embedding`, batch axis dynamic;
- the file is `<cache_dir>/<cache_key>...onnx`, keyed by export format, opset, torch version and the
  model's identity (for random weights: the tower's weights), written atomically, reused when present;
- before a session is used it must match torch (cosine >= 0.9999) on a few batches (`self_check`);
- `maybe_onnx` turns any failure into None (logged), so callers keep the torch path.

The tower loggers keep their names from before this package existed (`clipsearch.onnx_text`,
`clipsearch.onnx_image`), so logging configured by name keeps working.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray

from clipsearch.manifest import save_with, sha256_json
from clipsearch.models import LoadedModel

Tower = Literal["text", "image"]
Runtime = Literal["auto", "onnx", "bf16", "torch"]  # what runs a tower (`clipsearch.encoder.tower_backend`)

EXPORT_FORMAT = 1  # bump when an exported graph changes, so stale cache files are not reused
OPSET = 17
OUTPUT = "embedding"
MIN_COS = 0.9999
# rows of pixels per session run of an image tower: ONNX Runtime's CPU arena keeps the largest run's
# activations for the session's lifetime, and a 240 px EfficientNet-Lite1 needs ~30 MB of them per image,
# so one ingest batch of 64 images and their mirrors (128 rows) held ~3.8 GB. Runs of 4 hold ~0.11 GB
# and were as fast or faster here (docs/ingest_memory.md): the arena is bounded by this, not by the batch.
IMAGE_RUN_ROWS = 4
# input name, rank, dtype and shape (for messages) of each tower's graph
INPUTS: dict[Tower, tuple[str, int, type, str]] = {
    "text": ("tokens", 2, np.int64, "token ids [batch, length]"),
    "image": ("pixels", 4, np.float32, "pixels [batch, 3, H, W]"),
}


def tower_log(tower: Tower) -> logging.Logger:
    return logging.getLogger(f"clipsearch.onnx_{tower}")


def session_options(threads: int, spinning: bool = False) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    # one query at a time: all cores on one op (intra-op), no inter-op parallelism
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # off by default: on a shared 2-core machine (load ~5) spinning workers made a batch-1 query
    # ~1.4x slower (benchmarks/results/encoders_t2.json); on dedicated idle cores it can help a little
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3
    return so


def open_session(model: str | os.PathLike[str] | bytes, threads: int, spinning: bool = False) -> Any:
    """A CPU InferenceSession with the project's session options."""
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=session_options(threads, spinning),
                                providers=["CPUExecutionProvider"])


def export_module(module: torch.nn.Module, example: torch.Tensor, target: str | os.PathLike[str] | io.BytesIO,
                  input_name: str, output_names: list[str] | None = None,
                  dynamic_axes: dict[str, dict[int, str]] | None = None,
                  custom_opsets: dict[str, int] | None = None) -> None:
    """Export `module(example)` to a file (written atomically) or into a BytesIO: the one export call.

    The batch axis of the input and of every output is dynamic; `dynamic_axes` adds or replaces
    axes (the text towers' token length). Without `output_names` the outputs are counted by running
    the module once and named `embedding` (one) or `out0`, `out1`, ... The TorchScript exporter: it
    needs no onnxscript and keeps dynamic axes simple.
    """
    module = module.eval()
    if output_names is None:
        with torch.inference_mode():
            outs = module(example)
        n_out = len(outs) if isinstance(outs, (tuple, list)) else 1
        output_names = [OUTPUT] if n_out == 1 else [f"out{i}" for i in range(n_out)]
    axes = {input_name: {0: "batch"}, **{n: {0: "batch"} for n in output_names}, **(dynamic_axes or {})}

    def write(dst: Any) -> None:
        with warnings.catch_warnings(), torch.inference_mode():
            # the pooling index is argmax output (never negative), which is what this warns about
            warnings.filterwarnings("ignore", message=".*aten::index operator of advanced indexing.*")
            # shape arithmetic that is constant for our inputs (transformers' mask checks, timm's static
            # "same" padding) is what the tracer notes
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            # the TorchScript exporter is deprecated in favour of dynamo, which needs onnxscript
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            torch.onnx.export(module, (example,), dst if isinstance(dst, io.BytesIO) else str(dst),
                              input_names=[input_name], output_names=output_names, dynamic_axes=axes,
                              opset_version=OPSET, do_constant_folding=True, dynamo=False,
                              custom_opsets=custom_opsets)

    if isinstance(target, io.BytesIO):
        write(target)
    else:
        save_with(Path(target), write)


def tower_state_digest(model: torch.nn.Module, tower: Tower = "text") -> str:
    """Hash of one tower's weights (`image`: the `visual.` ones, `text`: the rest): random-init
    models share an identity but not weights."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if name.startswith("visual.") != (tower == "image"):
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_key(loaded: LoadedModel, tower: Tower = "text") -> str:
    """File-name key of an exported tower: export format, opset, torch version, model and weights identity."""
    ident = loaded.identity.to_dict()
    weights = ident["checkpoint_sha256"] or ident["pretrained"]
    if not weights:
        weights = "state:" + tower_state_digest(loaded.model, tower)
    payload = {"format": EXPORT_FORMAT, "opset": OPSET, "torch": torch.__version__,
               "model": ident["model"], "weights": weights}
    if tower != "text":  # text keys stay what they were, so existing text exports are reused
        payload["tower"] = tower
    return sha256_json(payload)[:24]


class OnnxTowerEncoder:
    """One exported tower on a CPU session: a batch -> float32 (n, d), L2-normalised (in the graph).

    A text tower takes token ids (`encode_tokens`), padded to any length: trailing all-padding
    columns (`pad_id`) are dropped first, which cannot change the result (CLIP: causal tower, pooled
    at the end-of-text token; HF: the graph masks padding out of attention and pooling). An image
    tower takes pixels (`encode_pixels`). So one instance fits `TokenEncoder` or `PixelEncoder`.
    """

    def __init__(self, path: str | os.PathLike[str], tower: Tower, threads: int = 1, spinning: bool = False,
                 pad_id: int = 0, max_rows: int | None = None):
        """`max_rows`: the most rows one session run gets (a larger batch runs in slices of it, with the
        same result); default `IMAGE_RUN_ROWS` for an image tower, no limit for a text tower."""
        self.path = Path(path)
        self.tower = tower
        self.threads = threads
        self.pad_id = pad_id
        self.max_rows = max_rows if max_rows is not None else (IMAGE_RUN_ROWS if tower == "image" else 0)
        self.session = open_session(self.path, threads, spinning)
        self.dim = int(self.session.get_outputs()[0].shape[-1])
        self.self_check_cos: float | None = None

    def encode(self, batch: torch.Tensor | np.ndarray) -> NDArray[np.float32]:
        name, ndim, dtype, shape = INPUTS[self.tower]
        x = batch.detach().cpu().numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
        if x.ndim != ndim:
            raise ValueError(f"expected {shape}, got shape {x.shape}")
        if x.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.tower == "text":
            real = np.flatnonzero((x != self.pad_id).any(axis=0))
            x = x[:, : int(real[-1]) + 1 if real.size else 1]
        x = np.ascontiguousarray(x, dtype=dtype)
        step = self.max_rows if self.max_rows > 0 else len(x)
        if step >= len(x):
            (out,) = self.session.run([OUTPUT], {name: x})
            return np.ascontiguousarray(out, dtype=np.float32)
        out = np.empty((len(x), self.dim), dtype=np.float32)
        for i in range(0, len(x), step):
            out[i:i + step] = self.session.run([OUTPUT], {name: x[i:i + step]})[0]
        return out

    def encode_tokens(self, tokens: torch.Tensor | np.ndarray) -> NDArray[np.float32]:
        self._expect("text")
        return self.encode(tokens)

    def encode_pixels(self, pixels: torch.Tensor | np.ndarray) -> NDArray[np.float32]:
        self._expect("image")
        return self.encode(pixels)

    def _expect(self, tower: Tower) -> None:
        if self.tower != tower:
            raise TypeError(f"{self.path.name} is an exported {self.tower} tower, not a {tower} tower")


def self_check(enc: OnnxTowerEncoder, reference: Callable[[torch.Tensor], torch.Tensor],
               batches: Iterable[torch.Tensor], min_cos: float = MIN_COS) -> float:
    """The worst cosine between the session and torch's `reference` (normalised here) over `batches`;
    RuntimeError below `min_cos`, so a graph that changes the result is never served."""
    worst = 1.0
    for x in batches:
        with torch.inference_mode():
            ref = torch.nn.functional.normalize(reference(x).float(), dim=-1).numpy()
        worst = min(worst, float((enc.encode(x) * ref).sum(1).min()))
    if worst < min_cos:
        raise RuntimeError(f"{getattr(enc, 'label', 'ONNX')} {enc.tower} tower disagrees with torch "
                           f"(min cosine {worst:.6f})")
    return worst


def maybe_onnx(tower: Tower, loaded: LoadedModel, missing: str | None,
               build: Callable[[], OnnxTowerEncoder]) -> OnnxTowerEncoder | None:
    """`build()`, or None (logged) when the tower cannot be exported (`missing` says why), the model is
    not on the CPU, or export / loading / the self-check fails."""
    log = tower_log(tower)
    if missing is not None:
        log.info("onnx %s: %s %s; using the torch %s path", tower, loaded.identity.model, missing, tower)
        return None
    if loaded.device.type != "cpu":  # the session is CPU-only; on a GPU the torch path is faster
        log.info("onnx %s: model is on %s; using the torch %s path", tower, loaded.device, tower)
        return None
    try:
        return build()
    except Exception as exc:  # any export/runtime failure falls back to torch, with the reason logged
        log.warning("onnx %s: export or load failed for %s (%s: %s); using the torch %s path",
                    tower, loaded.identity.model, type(exc).__name__, exc, tower)
        return None
    finally:
        release_memory()  # an export leaves large freed buffers and reference cycles behind


def release_memory() -> None:
    """Collect reference cycles and hand freed heap back to the OS (glibc `malloc_trim`).

    An in-process export and the transformer optimizer leave a few hundred MB behind: the ONNX
    protobufs in reference cycles, and freed heap that glibc keeps. Measured with lit-effnet1-minilm's
    text export: 1.70 GB RSS after it, 1.23 GB after this (docs/ingest_memory.md)."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        pass


MMAP_THRESHOLD = 256 * 1024


def return_large_frees(threshold: int = MMAP_THRESHOLD) -> bool:
    """Have glibc serve every allocation of `threshold` bytes or more with its own mapping, which goes
    back to the OS when freed (`mallopt(M_MMAP_THRESHOLD)`; this also stops glibc from raising the
    threshold by itself). Batch encoding frees a ~0.7 MB pixel tensor per image in decoding threads;
    under glibc's default the threshold soon rises above that size and the freed tensors stay in
    per-thread heaps: ~0.1-0.2 GB more RSS during a lit-effnet1-minilm ingest (docs/ingest_memory.md).
    Process-wide, so for batch jobs (ingest, embed), not the service. False where it cannot be set."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, int(threshold)))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        return False


def onnx_module_runner(module: torch.nn.Module, example: torch.Tensor, threads: int | None = None,
                       path: str | os.PathLike[str] | None = None,
                       input_name: str = "pixels") -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    """Export any module whose first input has a batch axis (to `path` when given and missing, else in
    memory) and return `run(x) -> tuple of output tensors` on an ONNX Runtime CPU session. The caller
    checks the result against the module (this only exports and runs). `threads` defaults to torch's
    intra-op budget. (The fine-tuning feature cache runs its frozen image trunk through it.)"""
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
