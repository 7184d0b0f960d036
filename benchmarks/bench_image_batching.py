"""What micro-batching image queries can win at most (issue 16, target 3), in one process: the cost per
image of the image tower the service runs, as the two service configurations of
`bench_speed_service.py` use it:

  b1 x 2 parallel   two batch-1 forwards side by side, each on a 1-thread tower (the service with
                    image batching off: CLIPSEARCH_IMAGE_BATCH_SIZE=1, IMAGE_THREADS=1, two workers)
  bB, T threads     one batch-B forward on a tower with every core (the default: micro-batched)

Variants interleaved rep by rep, medians of ms per image. The ratio of the first row to a batched row
is the most a batch of that size can give in throughput before decode, HTTP and search, which
batching does not share. `--backend` as the service's `CLIPSEARCH_IMAGE_BACKEND` (default auto: the
bf16 tower for a ViT on an AMX CPU). Random weights.

    python benchmarks/bench_image_batching.py --out benchmarks/results/image_batching.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import finish, log, machine_env  # noqa: E402
from clipsearch.encoder import image_backend_for  # noqa: E402
from clipsearch.models import load_model  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--backend", default="auto", choices=("auto", "onnx", "bf16", "torch"))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    torch.manual_seed(0)
    loaded = load_model(args.model, None, "cpu")
    cache = Path(tempfile.mkdtemp(prefix="bench_batching_"))
    one = image_backend_for(loaded, args.backend, cache, 1)
    every = image_backend_for(loaded, args.backend, cache, cores)
    if one is None or every is None:
        raise SystemExit(f"{args.model} has no {args.backend} image backend here")
    log(f"backend: {type(every).__name__} ({getattr(every, 'label', 'onnx')})")
    h = w = int(loaded.model.visual.image_size[0]) if hasattr(loaded.model.visual, "image_size") else 224
    g = torch.Generator().manual_seed(0)
    xs = {b: torch.randn(b, 3, h, w, generator=g) for b in sorted(set(args.batches) | {1})}
    pool = ThreadPoolExecutor(cores)

    def parallel_b1() -> None:
        list(pool.map(lambda _: one.encode_pixels(xs[1]), range(cores)))

    fns = {f"b1 x {cores} parallel, 1 thread each": (parallel_b1, cores)}
    for b in args.batches:
        fns[f"b{b}, {cores} threads"] = ((lambda b=b: every.encode_pixels(xs[b])), b)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn, _ in fns.values():
        fn()
    for _ in range(args.reps):
        for name, (fn, n) in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) / n * 1000)
    base_name = next(iter(fns))
    base = float(np.median(times[base_name]))
    rows = [{"path": k, "ms_per_image": round(float(np.median(v)), 2),
             "x_unbatched": round(base / float(np.median(v)), 2)} for k, v in times.items()]
    result = {"benchmark": "image_batching", "model": args.model, "weights": "random",
              "backend": getattr(every, "label", type(every).__name__), "env": machine_env(cores), "rows": rows}
    lines = ["| path | ms per image | x unbatched |", "|---|---|---|"]
    lines += [f"| {r['path']} | {r['ms_per_image']} | {r['x_unbatched']} |" for r in rows]
    return finish(result, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
