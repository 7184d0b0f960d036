"""Retrieval recall and speed of the ONNX Runtime paths against torch, on a real split.

The project may use an ONNX Runtime path only if Recall@K on the Flickr8k test split stays within
0.5 points of the fp32 torch path and it is faster. This script encodes the split's images and
captions twice with the same trained checkpoint, once with the torch towers and once with the ONNX
towers the service and `offline embed` use by default, and reports Recall@1/5/10 both ways, the
largest difference, the minimum cosine between the two embeddings of each item and the encode time.

    python benchmarks/bench_onnx_recall.py --artifacts artifacts --split test \\
        --out benchmarks/results/onnx_recall.json

The model and checkpoint are the ones named in `<artifacts>/embeddings/<split>/manifest.json`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import finish, log, machine_env  # noqa: E402
from clipsearch.encoder import build_encoder  # noqa: E402
from clipsearch.images import decode_image  # noqa: E402
from clipsearch.manifest import read_json  # noqa: E402
from clipsearch.models import load_model  # noqa: E402
from clipsearch.recall import KS, retrieval_metrics  # noqa: E402
from offline.finetune import read_split_data  # noqa: E402


def model_of(artifacts: Path, split: str) -> tuple[str, str | None]:
    manifest = read_json(artifacts / "embeddings" / split / "manifest.json")
    model = manifest.get("model", {})
    return model["model"], model.get("pretrained")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    name, pretrained = model_of(args.artifacts, args.split)
    loaded = load_model(name, pretrained, "cpu")
    data = read_split_data(args.artifacts, args.split)
    paths, captions, t2i = data.image_paths, data.captions, data.text_to_image
    images = [decode_image(p) for p in paths]
    cache = tempfile.mkdtemp(prefix="bench_onnx_recall_")
    encoders = {runtime: build_encoder(loaded, text=runtime, image=runtime, cache_dir=cache, threads=args.threads,
                                       batch_size=args.batch)
                for runtime in ("torch", "onnx")}
    result: dict[str, Any] = {
        "benchmark": "onnx_recall", "model": name, "pretrained": pretrained, "split": args.split,
        "images": len(paths), "captions": len(captions), "batch": args.batch,
        "env": machine_env(args.threads, torch=torch.__version__),
        "onnx_towers": {"text": encoders["onnx"].text_backend is not None,
                        "image": encoders["onnx"].image_backend is not None},
        "paths": {}}
    emb: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for label, enc in encoders.items():
        t = time.perf_counter()
        img = enc.encode_images(images)
        t_img = time.perf_counter() - t
        t = time.perf_counter()
        txt = enc.encode_texts(captions)
        t_txt = time.perf_counter() - t
        emb[label] = (img, txt)
        metrics = retrieval_metrics(img, txt, t2i, KS)
        result["paths"][label] = {"recall": {k: v for k, v in metrics.items() if "_R@" in k},
                                  "image_encode_s": round(t_img, 2), "text_encode_s": round(t_txt, 2)}
        log(f"{label}: images {t_img:.1f}s, captions {t_txt:.1f}s, "
            + ", ".join(f"{k} {v:.2f}" for k, v in result["paths"][label]["recall"].items()))
    a, b = result["paths"]["torch"]["recall"], result["paths"]["onnx"]["recall"]
    result["max_abs_recall_diff_points"] = round(max(abs(a[k] - b[k]) for k in a), 3)
    result["min_cosine"] = {"images": round(float((emb["torch"][0] * emb["onnx"][0]).sum(1).min()), 6),
                            "captions": round(float((emb["torch"][1] * emb["onnx"][1]).sum(1).min()), 6)}
    result["speedup"] = {
        "images": round(result["paths"]["torch"]["image_encode_s"] / result["paths"]["onnx"]["image_encode_s"], 2),
        "captions": round(result["paths"]["torch"]["text_encode_s"] / result["paths"]["onnx"]["text_encode_s"], 2)}
    lines = [f"{'path':<6} " + " ".join(f"{k.replace('text_to_image', 'T>I').replace('image_to_text', 'I>T'):>9}"
                                          for k in a) + f" {'img s':>7} {'txt s':>7}"]
    for label, r in result["paths"].items():
        lines.append(f"{label:<6} " + " ".join(f"{v:>9.2f}" for v in r["recall"].values())
                     + f" {r['image_encode_s']:>7.1f} {r['text_encode_s']:>7.1f}")
    lines.append(f"max |diff| {result['max_abs_recall_diff_points']} points; min cos {result['min_cosine']}; "
                 f"speed-up {result['speedup']}")
    return finish(result, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
