"""ViT image tower benchmark: eager torch `encode_image` against the ONNX Runtime export (issue 16).

Variants, each at batch 1 and at `--batch` (32), all in one run, interleaved (rep r runs every
variant once) on the same real Flickr8k pixels (random ones when the folder is missing):
  torch           `model.encode_image(pixels)` then L2-normalise, eager, `--threads` intra-op threads
  onnx            what `clipsearch.onnx.image.build_onnx_image` picks (the service and ingest default)
  onnx:<file>     every other ViT variant file (`vit-attention[.fused]`, `vit-plain[.fused]`)
  bf16            the bf16 copy of the tower (`clipsearch.bf16`, self-checked against fp32), what the
                  default image backend ("auto") picks for a ViT on a CPU with AMX-BF16

Each ONNX row reports its median ms, images/s, the ratio to torch (x torch = torch ms / its ms) and
the min cosine to torch's embedding. Random weights: speed does not depend on them.

    python benchmarks/bench_vit_image.py --out benchmarks/results/vit_image.json
"""

from __future__ import annotations

import argparse
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
from clipsearch.models import load_model  # noqa: E402
from clipsearch.bf16 import maybe_bf16_image, pays_in_bf16  # noqa: E402
from clipsearch.onnx.image import build_onnx_image  # noqa: E402



def pixels(loaded, n: int, data: Path) -> torch.Tensor:
    files = sorted((data / "Images").glob("*.jpg"))[:n] if (data / "Images").is_dir() else []
    if len(files) < n:
        return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    from clipsearch.images import decode_image

    return torch.stack([loaded.preprocess(decode_image(str(f))) for f in files])


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps1", type=int, default=15, help="repetitions at batch 1")
    ap.add_argument("--reps", type=int, default=4, help="repetitions at --batch")
    ap.add_argument("--data", type=Path, default=flickr8k_dir(), help=FLICKR8K_HELP)
    ap.add_argument("--cache", type=Path, help="ONNX cache folder (default: a temporary one)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    env = machine_env(args.threads, torch=torch.__version__, onnxruntime=__import__("onnxruntime").__version__)
    torch.manual_seed(0)
    loaded = load_model(args.model, None, "cpu")
    model = loaded.model.eval()
    cache = args.cache or Path(tempfile.mkdtemp(prefix="bench_vit_onnx_"))
    t = time.perf_counter()
    chosen = build_onnx_image(loaded, cache, threads=args.threads)
    export_s = time.perf_counter() - t
    log(f"export + self-check {export_s:.1f}s: {chosen.path.name} (cos {chosen.self_check_cos:.6f})")
    sessions = {"onnx": chosen}
    for variant in ("attention", "plain"):
        for fuse in (True, False):
            enc = build_onnx_image(loaded, cache, threads=args.threads, fuse=fuse, variants=(variant,))
            if enc.path != chosen.path:
                sessions[f"onnx:{enc.path.name.split('.image.')[1][:-5]}"] = enc
    bf16 = maybe_bf16_image(loaded, threads=args.threads)
    if bf16 is not None:
        sessions["bf16"] = bf16
        log(f"bf16 tower: self-check cos {bf16.self_check_cos:.6f}")
    default = "bf16" if bf16 is not None and pays_in_bf16(loaded) else "onnx"
    rows = []
    x_all = pixels(loaded, args.batch, args.data)
    for batch, reps in ((1, args.reps1), (args.batch, args.reps)):
        x = x_all[:batch].contiguous()
        with torch.inference_mode():
            ref = F.normalize(model.encode_image(x).float(), dim=-1).numpy()

        def torch_fn() -> None:
            with torch.inference_mode():
                F.normalize(model.encode_image(x).float(), dim=-1)

        fns: dict[str, Callable[[], Any]] = {"torch": torch_fn}
        for name, enc in sessions.items():
            fns[name] = (lambda e=enc: e.encode_pixels(x))
        log(f"batch {batch}: {reps} interleaved reps of {len(fns)} variants")
        times = interleaved(fns, reps)
        base = float(np.median(times["torch"]))
        for name, ts in times.items():
            med = float(np.median(ts))
            cos = 1.0 if name == "torch" else float((sessions[name].encode_pixels(x) * ref).sum(1).min())
            rows.append({"batch": batch, "path": name, "median_ms": round(med * 1000, 2),
                         "images_per_s": round(batch / med, 2), "x_torch": round(base / med, 3),
                         "min_cos_vs_torch": round(cos, 6), "reps": reps})
    result = {"benchmark": "vit_image", "model": args.model, "weights": "random", "env": env,
              "chosen": chosen.path.name, "default": default,
              "bf16_self_check_cos": None if bf16 is None else round(bf16.self_check_cos, 6),
              "export_and_check_s": round(export_s, 1), "rows": rows}
    lines = ["| batch | path | median ms | img/s | x torch | min cos |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['path']} | {r['median_ms']} | {r['images_per_s']} | {r['x_torch']} | "
              f"{r['min_cos_vs_torch']:.6f} |" for r in rows]
    return finish(result, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
