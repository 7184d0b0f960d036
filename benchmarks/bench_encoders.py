"""Encoder benchmark: naive open_clip `encode_text` / `encode_image` against the project's paths.

Text paths, for a typical short query (batch 1) and a batch of real Flickr8k captions:
  naive          `model.encode_text(tokens)` on the tokenizer's full padded length (77; 64 for
                 lit-effnet-minilm), then L2-normalise: what open_clip examples do
  torch-trunc    `ClipEncoder.encode_tokens`: only up to the longest real token (exact, see encoder.py)
  onnx           `clipsearch.onnx.text` session (CLIP and Hugging Face text towers), as the service
                 opens it (`session.intra_op.allow_spinning=0`)
  onnx-spin      the same file with spinning intra-op threads
  onnx-int8      (`--int8`, informational) onnxruntime dynamic int8 of the plain export; not used by
                 the service (see benchmarks/README.md for why)
Image paths at batch 1 and 32: `model.encode_image` (naive; the project's torch `encode_pixels` is the
same call) and, for timm towers (lit-effnet-minilm), the `clipsearch.onnx.image` session (`onnx`).

Every path is timed in the same run, interleaved (rep r runs every variant once, `--inner` calls each),
and the medians are reported with the ratio to the naive path and the cosine to the naive embedding.
Random weights (`load_model(name, None)`) are enough for speed; speed does not depend on them.

    python benchmarks/bench_encoders.py --out benchmarks/results/encoders.json --plot docs/bench_encoders.png
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import FLICKR8K_HELP, finish, flickr8k_dir, log, machine_env  # noqa: E402
from clipsearch.encoder import ClipEncoder  # noqa: E402
from clipsearch.models import load_model  # noqa: E402

QUERY = "a dog runs on the beach with a ball"  # a typical short query (11 tokens with sot/eot)
FALLBACK_CAPTIONS = [
    "A child in a pink dress is climbing up a set of stairs in an entry way .",
    "A black dog and a spotted dog are fighting", "A man in a red shirt is climbing a rock wall .",
    "two children play football in a park", "a dog", "A surfer rides a large wave .",
]


def captions(n: int, data: Path) -> list[str]:
    """`n` real captions (every 8th line of Flickr8k's captions.txt, deterministic) or a fallback."""
    path = data / "captions.txt"
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [r["caption"] for r in csv.DictReader(fh)]
        return rows[::8][:n]
    return (FALLBACK_CAPTIONS * n)[:n]


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, inner: int, warmup: int = 2) -> dict[str, dict]:
    """ms per call of every fn: `reps` rounds, each round runs every fn `inner` times in turn."""
    with torch.inference_mode():
        for f in fns.values():
            for _ in range(warmup):
                f()
        samples: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(reps):
            for k, f in fns.items():
                t = time.perf_counter()
                for _ in range(inner):
                    f()
                samples[k].append((time.perf_counter() - t) * 1000 / inner)
    return {k: {"ms_median": round(float(np.median(v)), 3), "ms_min": round(float(np.min(v)), 3),
                "ms_p90": round(float(np.percentile(v, 90)), 3), "reps": reps, "inner": inner}
            for k, v in samples.items()}


def _np(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)


def int8_session(plain_onnx: Path, threads: int):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from clipsearch.onnx import OnnxTowerEncoder

    q = plain_onnx.with_name(plain_onnx.name.replace(".onnx", ".int8.onnx"))
    if not q.is_file():
        quantize_dynamic(str(plain_onnx), str(q), weight_type=QuantType.QInt8)
    return OnnxTowerEncoder(q, "text", threads=threads)


def bench_model(name: str, args, cache_dir: Path) -> list[dict[str, Any]]:
    from clipsearch.onnx import OnnxTowerEncoder, build_onnx_text, maybe_onnx_text

    torch.manual_seed(0)
    t = time.perf_counter()
    loaded = load_model(name, None, "cpu")
    log(f"{name}: loaded in {time.perf_counter() - t:.1f}s")
    model = loaded.model
    enc = ClipEncoder(loaded, batch_size=max(args.batch, 1))
    rows: list[dict[str, Any]] = []

    onnx = maybe_onnx_text(loaded, cache_dir, threads=args.threads) if not args.no_onnx else None
    extra: dict[str, Any] = {}
    if onnx is not None:
        extra["onnx-spin"] = OnnxTowerEncoder(onnx.path, "text", threads=args.threads, spinning=True,
                                              pad_id=onnx.pad_id)
        if args.int8:
            from clipsearch.onnx.text import HF_VARIANTS, VARIANTS, text_tower_kind

            unfused = (VARIANTS if text_tower_kind(model) == "clip" else HF_VARIANTS)[-1]  # standard ONNX ops only
            plain = build_onnx_text(loaded, cache_dir, threads=args.threads, fuse=False, variants=(unfused,))
            extra["onnx-int8"] = int8_session(plain.path, args.threads)

    for batch, texts in ((1, [args.query]), (args.batch, captions(args.batch, args.data))):
        tokens = loaded.tokenizer(texts)
        real_len = int((tokens != enc._pad_id).sum(1).max())
        fns: dict[str, Callable[[], Any]] = {
            "naive": lambda tokens=tokens: F.normalize(model.encode_text(tokens).float(), dim=-1),
            "torch-trunc": lambda tokens=tokens: enc.encode_tokens(tokens),
        }
        if onnx is not None:
            fns["onnx"] = lambda tokens=tokens: onnx.encode_tokens(tokens)
            for k, e in extra.items():
                fns[k] = lambda tokens=tokens, e=e: e.encode_tokens(tokens)
        with torch.inference_mode():
            ref = _np(fns["naive"]())
            cos = {k: round(float((_np(f()) * ref).sum(1).min()), 6) for k, f in fns.items()}
        inner = args.inner if batch == 1 else max(1, args.inner // 4)
        res = interleaved(fns, args.reps, inner)
        base = res["naive"]["ms_median"]
        for k, r in res.items():
            rows.append({"model": name, "tower": "text", "path": k, "batch": batch,
                         "tokens_padded": int(tokens.shape[1]), "tokens_real_max": real_len,
                         **r, "speedup_vs_naive": round(base / r["ms_median"], 2), "min_cos_vs_naive": cos[k],
                         "onnx_file": (onnx.path.name if k == "onnx" and onnx else None)})
        log(f"{name} text b={batch}: " + ", ".join(f"{k} {r['ms_median']:.1f}ms" for k, r in res.items()))

    onnx_image = None
    if not args.no_image and not args.no_onnx:
        from clipsearch.onnx import maybe_onnx_image

        onnx_image = maybe_onnx_image(loaded, cache_dir, threads=args.threads)  # None for ViT towers
    size = loaded.preprocess.transforms[0].size if hasattr(loaded.preprocess, "transforms") else 224
    size = size if isinstance(size, (tuple, list)) else (size, size)
    if not args.no_image:
        for batch in (1, args.batch):
            pixels = torch.randn(batch, 3, *size)
            fns = {"naive": lambda p=pixels: F.normalize(model.encode_image(p).float(), dim=-1),
                   "encode_pixels": lambda p=pixels: enc.encode_pixels(p)}
            if onnx_image is not None:
                fns["onnx"] = lambda p=pixels: onnx_image.encode_pixels(p)
            with torch.inference_mode():
                ref = _np(fns["naive"]())
                cos = {k: round(float((_np(f()) * ref).sum(1).min()), 6) for k, f in fns.items()}
            res = interleaved(fns, max(3, args.reps // 2), 2 if batch == 1 else 1)
            base = res["naive"]["ms_median"]
            for k, r in res.items():
                rows.append({"model": name, "tower": "image", "path": k, "batch": batch, **r,
                             "images_per_s": round(batch * 1000 / r["ms_median"], 1),
                             "speedup_vs_naive": round(base / r["ms_median"], 2), "min_cos_vs_naive": cos[k]})
            log(f"{name} image b={batch}: naive {base:.1f}ms")
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    out = [f"{'model':<18} {'tower':<5} {'batch':>5} {'path':<13} {'tokens':>7} {'ms':>9} {'x naive':>8} {'cos':>9}"]
    for r in rows:
        tok = f"{r.get('tokens_real_max', '')}/{r.get('tokens_padded', '')}" if r["tower"] == "text" else ""
        cos = f"{r['min_cos_vs_naive']:.6f}" if "min_cos_vs_naive" in r else ""
        out.append(f"{r['model']:<18} {r['tower']:<5} {r['batch']:>5} {r['path']:<13} {tok:>7} "
                   f"{r['ms_median']:>9.2f} {r['speedup_vs_naive']:>8.2f} {cos:>9}")
    return "\n".join(out)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["tower"] == "text"]
    groups = sorted({(r["model"], r["batch"]) for r in rows}, key=lambda g: (g[0], g[1]))
    paths = [p for p in ("naive", "torch-trunc", "onnx", "onnx-spin", "onnx-int8")
             if any(r["path"] == p for r in rows)]
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.6), squeeze=False)
    for ax, (model, batch) in zip(axes[0], groups):
        sel = {r["path"]: r for r in rows if r["model"] == model and r["batch"] == batch}
        names = [p for p in paths if p in sel]
        bars = ax.bar(range(len(names)), [sel[p]["ms_median"] for p in names],
                      color=["#999999", "#4c72b0", "#55a868", "#8fd19e", "#c44e52"][:len(names)])
        for b, p in zip(bars, names):
            ax.annotate(f"{sel[p]['speedup_vs_naive']:.1f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
        ax.set_title(f"{model}, text, batch {batch}", fontsize=8)
        ax.set_ylabel("ms / call (median)", fontsize=7)
    env = result["env"]
    fig.suptitle(f"{env['cpu_count']} cores, {env['threads']} threads, OMP_WAIT_POLICY="
                 f"{env.get('OMP_WAIT_POLICY')}, load {env['loadavg_start'][0]:.1f} at start", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["ViT-B-32", "lit-effnet-minilm"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--query", default=QUERY)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--inner", type=int, default=4, help="calls per variant per rep at batch 1")
    ap.add_argument("--data", type=Path, default=flickr8k_dir(), help=FLICKR8K_HELP + "; its captions are the batch")
    ap.add_argument("--cache", type=Path, help="ONNX cache folder (default: a temporary one)")
    ap.add_argument("--int8", action="store_true", help="also time onnxruntime dynamic int8 (informational)")
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--no-image", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    # the thread counts under test, set once: torch intra-op pool and (per session) onnxruntime's
    torch.set_num_threads(args.threads)
    import onnxruntime

    result: dict[str, Any] = {"benchmark": "encoders",
                              "env": machine_env(args.threads, torch=torch.__version__,
                                                 onnxruntime=onnxruntime.__version__),
                              "argv": sys.argv[1:] if argv is None else argv, "query": args.query}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp)
        for name in args.models:
            rows.extend(bench_model(name, args, cache))
    result["rows"] = rows
    finish(result, table(rows), args.out)
    if args.plot:
        plot(result, args.plot)
    return result


if __name__ == "__main__":
    main()
