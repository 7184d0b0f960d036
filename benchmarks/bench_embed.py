"""Offline embedding throughput: does JPEG decoding hide behind the forward pass?

For ~256 real Flickr8k images and each model, images/s of
  pure-forward   `ClipEncoder.encode_pixels` on pre-decoded, pre-processed tensors (the ceiling)
  workers=N      `offline.embed.embed_images` (decode + preprocess in N DataLoader workers, N=0: in
                 a thread pool of the main process overlapped with the forward pass, offline/prefetch.py)
  serial decode  (`--serial`) the N=0 loop before that: each batch decoded between forward passes
and, for models with a timm image tower (lit-effnet-minilm), the same two with the ONNX Runtime image
tower that `offline embed` uses by default (`onnx pure-forward`, `onnx workers=N`; the ratio of
those rows is to the ONNX pure forward). `--no-onnx` skips them.
all in the same run, interleaved (each rep runs every variant once), medians reported, plus the
ratio to pure forward (target: >= 0.9 with workers). Random weights are enough for speed.

    python benchmarks/bench_embed.py --out benchmarks/results/embed.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would interleave with the timings

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import FLICKR8K_HELP, finish, flickr8k_dir, log, machine_env, write_json  # noqa: E402
from clipsearch.encoder import ClipEncoder  # noqa: E402
from clipsearch.images import decode_image  # noqa: E402
from clipsearch.models import load_model  # noqa: E402
from offline.embed import embed_images  # noqa: E402



def image_paths(data: Path, n: int) -> list[str]:
    """The first `n` test-split images (sorted), or any `n` images when the split list is missing."""
    folder = data / "Images"
    listing = data / "Flickr_8k.testImages.txt"
    names = sorted(x.strip() for x in listing.read_text().split() if x.strip()) if listing.is_file() \
        else sorted(p.name for p in folder.glob("*.jpg"))
    paths = [str(folder / nm) for nm in names if (folder / nm).is_file()][:n]
    if len(paths) < n:
        raise SystemExit(f"only {len(paths)} images found under {folder}; need {n}")
    return paths


def bench_model(name: str, paths: list[str], args) -> dict[str, Any]:
    torch.manual_seed(0)
    loaded = load_model(name, None, "cpu")
    enc = ClipEncoder(loaded, batch_size=args.batch)
    t = time.perf_counter()
    pixels = torch.stack([loaded.preprocess(decode_image(p)) for p in paths])
    decode_s = time.perf_counter() - t
    log(f"{name}: decoded+preprocessed {len(paths)} images in {decode_s:.1f}s in the main process")

    def pure() -> None:
        for i in range(0, len(pixels), args.batch):
            enc.encode_pixels(pixels[i:i + args.batch])

    def serial(backend=None) -> None:
        """The loop before offline/prefetch.py: each batch decoded in the encoding thread, then encoded."""
        from torch.utils.data import DataLoader

        from offline.embed import ImageFiles, collate_images

        e = ClipEncoder(loaded, batch_size=args.batch, image_backend=backend)
        for _, px, _ in DataLoader(ImageFiles(paths, loaded.preprocess), batch_size=args.batch,
                                   num_workers=0, collate_fn=collate_images):
            if px is not None:
                e.encode_pixels(px)

    fns: dict[str, Callable[[], Any]] = {"pure-forward": pure}
    if args.serial:
        fns["serial decode"] = serial
    for w in args.workers:
        fns[f"workers={w}"] = lambda w=w: embed_images(loaded, paths, args.batch, w, desc=name)
    onnx = None
    if not args.no_onnx:
        import tempfile

        from clipsearch.onnx.image import maybe_onnx_image

        onnx = maybe_onnx_image(loaded, tempfile.mkdtemp(prefix="bench_embed_onnx_"), threads=args.threads)
    if onnx is not None:
        def onnx_pure() -> None:
            for i in range(0, len(pixels), args.batch):
                onnx.encode_pixels(pixels[i:i + args.batch])

        fns["onnx pure-forward"] = onnx_pure
        if args.serial:
            fns["onnx serial decode"] = lambda: serial(onnx)
        for w in args.workers:
            fns[f"onnx workers={w}"] = lambda w=w: embed_images(loaded, paths, args.batch, w, desc=name,
                                                                image_backend=onnx)

    with torch.inference_mode():
        pure()  # warm-up (allocator, oneDNN kernels)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(args.reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            samples[k].append(len(paths) / (time.perf_counter() - t))
        log(f"{name} rep {rep + 1}/{args.reps}: " + ", ".join(f"{k} {v[-1]:.1f}/s" for k, v in samples.items()))
    med = {k: float(np.median(v)) for k, v in samples.items()}
    rows = [{"variant": k, "images_per_s_median": round(v, 2),
             "images_per_s_all": [round(x, 2) for x in samples[k]],
             "ratio_to_pure_forward": round(v / med["onnx pure-forward" if k.startswith("onnx") else "pure-forward"], 3)}
            for k, v in med.items()]
    return {"model": name, "images": len(paths), "batch": args.batch,
            "decode_preprocess_ms_per_image_main_process": round(decode_s * 1000 / len(paths), 2),
            "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["ViT-B-32", "lit-effnet-minilm"])
    ap.add_argument("--data", type=Path, default=flickr8k_dir(), help=FLICKR8K_HELP)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime image-tower rows")
    ap.add_argument("--serial", action="store_true",
                    help="also time the loop before the decode thread pool (workers=0 decoded each batch "
                         "in the encoding thread)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    # torch's intra-op pool for the forward pass; DataLoader workers are separate processes
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"benchmark": "embed", "argv": sys.argv[1:] if argv is None else argv,
                              "env": machine_env(args.threads, torch=torch.__version__)}
    paths = image_paths(args.data, args.images)
    result["models"] = []
    for m in args.models:
        result["models"].append(bench_model(m, paths, args))
        write_json(args.out, {**result, "partial": m != args.models[-1]})  # kept if a later model fails
    lines = [f"{'model':<18} {'variant':<19} {'img/s':>8} {'x pure':>7}"]
    for m in result["models"]:
        for r in m["rows"]:
            lines.append(f"{m['model']:<18} {r['variant']:<19} {r['images_per_s_median']:>8.1f} "
                         f"{r['ratio_to_pure_forward']:>7.3f}")
    return finish(result, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
