"""Levers on the offline model's recall that need no retraining, measured on a built model.

    python benchmarks/bench_model_levers.py --artifacts ART [--cache DIR]

ART is a `python -m offline build` output (its model.json, splits/, embeddings/{train,val,test}).
Three levers, each chosen on val (the best of a small grid, ties to the smaller beta) and then
applied to test once:

1. text -> image hubness correction: each gallery image's score is offset by -beta * (its mean
   cosine to its k nearest *train captions*), the mirror of the image -> text correction the build
   already applies with a bank of train images;
2. test-time augmentation of the gallery: each gallery image embedded as the normalised mean of the
   image and its horizontal mirror (an ingest-time cost only), with and without lever 1;
3. image -> text with the query image's mirror averaged in (a query-time cost: two image forwards)
   and the image -> text correction's beta/k re-chosen.

Prints a JSON record and a table. The train captions and the mirrored val/test images are embedded
once and cached in --cache (the slow part: ~30,000 captions and 2,000 images).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipsearch.recall import caption_groups, exact_ranks  # noqa: E402
from offline.hubness import bank_similarity  # noqa: E402

KS = (1, 5, 10)
T2I_GRID = [(0.0, 10)] + [(b, k) for k in (10, 20, 50) for b in (0.4, 0.5, 0.6, 0.7, 0.8)]
I2T_GRID = [(0.0, 10)] + [(b, k) for k in (10, 20, 50) for b in (0.6, 0.7, 0.8, 0.9, 1.0)]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def recall(ranks: np.ndarray) -> dict[int, float]:
    return {k: round(float((ranks <= k).mean() * 100), 2) for k in KS}


def score(r: dict[int, float]) -> float:
    return round(float(np.mean([r[k] for k in KS])), 3)


class Levers:
    def __init__(self, art: Path, cache: Path):
        from offline.embed import load_embeddings, load_image_embeddings
        self.art, self.cache = art, cache
        self.cache.mkdir(parents=True, exist_ok=True)
        self.emb = {s: load_embeddings(art, s) for s in ("val", "test")}
        self.image_bank = load_image_embeddings(art, "train")["images"]
        self._loaded = None
        self.caption_bank = self._cached("train_captions", self._embed_train_captions)
        self.mirror = {s: self._cached(f"{s}_mirror", lambda s=s: self._embed_mirrored(s)) for s in ("val", "test")}

    # -- embedding (cached) ---------------------------------------------------------------------
    def _cached(self, name: str, make) -> np.ndarray:
        path = self.cache / f"{name}.npy"
        if path.is_file():
            return np.load(path)
        t0 = time.perf_counter()
        arr = make()
        np.save(path, arr)
        print(f"embedded {name}: {len(arr)} vectors in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        return arr

    def _model(self):
        if self._loaded is None:
            from clipsearch.models import load_model
            m = json.loads((self.art / "model.json").read_text())
            self._loaded = load_model(m["model"], m["pretrained"], device="cpu",
                                      checkpoint_sha256=m.get("checkpoint_sha256"))
        return self._loaded

    def _embed_train_captions(self) -> np.ndarray:
        from clipsearch.encoder import text_backend_for
        from offline.embed import embed_texts, split_records
        loaded = self._model()
        _, texts, _ = split_records(self.art, "train")
        backend = text_backend_for(loaded, "onnx", self.cache / "onnx", 2)
        return embed_texts(loaded, [t["caption"] for t in texts], 128, text_backend=backend)

    def _embed_mirrored(self, split: str) -> np.ndarray:
        import torch
        from PIL import ImageOps

        from clipsearch.encoder import ClipEncoder, image_backend_for
        from clipsearch.images import decode_image
        from offline.embed import split_records
        loaded = self._model()
        encoder = ClipEncoder(loaded, batch_size=64,
                              image_backend=image_backend_for(loaded, "onnx", self.cache / "onnx", 2))
        images, _, _ = split_records(self.art, split)
        if [r["image_id"] for r in images] != [r["image_id"] for r in self.emb[split]["image_records"]]:
            raise SystemExit(f"{split}: the embeddings' image order differs from the split's")
        parts = []
        for i in range(0, len(images), 64):
            batch = [ImageOps.mirror(decode_image(r["image_path"])) for r in images[i:i + 64]]
            parts.append(encoder.encode_pixels(torch.stack([loaded.preprocess(im) for im in batch])).cpu().numpy())
        return np.concatenate(parts).astype(np.float32)

    # -- measurements ---------------------------------------------------------------------------
    def gallery(self, split: str, tta: bool) -> np.ndarray:
        images = self.emb[split]["images"]
        return unit(images + self.mirror[split]) if tta else images

    def t2i(self, split: str, tta: bool, beta: float, k: int) -> dict[int, float]:
        e, gallery = self.emb[split], self.gallery(split, tta)
        offsets = None if beta == 0 else (-beta * bank_similarity(gallery, self.caption_bank, k)).astype(np.float32)
        return recall(exact_ranks(e["texts"], gallery, [np.array([j]) for j in e["text_to_image"]],
                                  gallery_offsets=offsets))

    def i2t(self, split: str, tta: bool, beta: float, k: int) -> dict[int, float]:
        e = self.emb[split]
        queries = self.gallery(split, tta)
        offsets = None if beta == 0 else (-beta * bank_similarity(e["texts"], self.image_bank, k)).astype(np.float32)
        groups = caption_groups(np.asarray(e["text_to_image"]), len(queries))
        return recall(exact_ranks(queries, e["texts"], groups, gallery_offsets=offsets))


def choose(measure, grid) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rows = [{"beta": b, "k": k, "val": (v := measure("val", b, k)), "val_score": score(v)} for b, k in grid]
    best = max(rows, key=lambda r: (r["val_score"], -r["beta"]))
    return best, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/clipsearch-levers"))
    ap.add_argument("--json", type=Path, help="also write the record here")
    args = ap.parse_args(argv)
    lv = Levers(args.artifacts, args.cache)
    record: dict[str, Any] = {"artifacts": str(args.artifacts), "model": json.loads((args.artifacts / "model.json").read_text()),
                              "recipes": []}
    recipes = [
        ("T→I plain (today)", "t2i", False, [(0.0, 10)]),
        ("T→I + hubness (train-caption bank)", "t2i", False, T2I_GRID),
        ("T→I, gallery mirror TTA", "t2i", True, [(0.0, 10)]),
        ("T→I, gallery mirror TTA + hubness", "t2i", True, T2I_GRID),
        ("I→T served (today: β 0.8, k 10)", "i2t", False, [(0.8, 10)]),
        ("I→T, hubness β/k re-chosen", "i2t", False, I2T_GRID),
        ("I→T, query mirror TTA + hubness", "i2t", True, I2T_GRID),
    ]
    for name, direction, tta, grid in recipes:
        fn = getattr(lv, direction)
        best, rows = choose(lambda split, b, k: fn(split, tta, b, k), grid)
        test = fn("test", tta, best["beta"], best["k"])  # test touched once per recipe
        record["recipes"].append({"recipe": name, "direction": direction, "tta": tta, "beta": best["beta"],
                                  "k": best["k"], "val": best["val"], "test": test, "grid": rows})
    print(json.dumps(record, indent=1, default=str))
    print(f"\n| recipe | chosen on val (β, k) | val R@1/5/10 | test R@1/5/10 |\n|---|---|---|---|")
    for r in record["recipes"]:
        fmt = lambda d: " / ".join(f"{d[k]:.2f}" for k in KS)  # noqa: E731
        print(f"| {r['recipe']} | {r['beta']}, {r['k']} | {fmt(r['val'])} | {fmt(r['test'])} |")
    if args.json:
        args.json.write_text(json.dumps(record, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
