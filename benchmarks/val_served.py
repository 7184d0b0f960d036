"""Val figures of offline-model checkpoints as they would be served, without touching test.

    python benchmarks/val_served.py --out OUT CKPT [CKPT ...]

OUT is a `python -m offline prepare` output (its splits/); each CKPT a `lit-effnet1-minilm` checkpoint
(`--model lit-effnet-minilm` for the Lite0 one)
(`models/*.pt` of a finetune run). For each checkpoint, from the frozen-tower feature cache
(`<OUT>/features/`, filled on the first run; the last two MiniLM layers and the heads run per
checkpoint), with images plain and mirror-averaged (`image_tta: mirror`):
- the plain cosine recall on val, both directions;
- both hubness corrections chosen on val as the `hubness` stage chooses them (train banks, β over
  `offline.hubness.BETAS`, k over `K_GRID`, by the direction's mean R@1/5/10), and the recall with them;
- `uploaded_query_i2t`: image → caption as the service answers an *uploaded* image (embedded plain,
  once) against the mirror-served captions and their correction (β, k and bank as chosen for mirror).

That is what a build would report as val with this checkpoint, so recipes can be compared on val
alone. Prints one JSON line per checkpoint, then a table (score = mean R@1/5/10 of both directions).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipsearch.models import OFFLINE_MODEL, load_model  # noqa: E402
from clipsearch.recall import KS, retrieval_metrics  # noqa: E402
from offline.finetune.features import FeatureBackend, extract_features  # noqa: E402
from offline.finetune.inputs import read_split_data  # noqa: E402
from clipsearch.hubness import bank_similarity  # noqa: E402
from offline.hubness import BETAS, K_GRID, choose  # noqa: E402

DIRECTIONS = ("text_to_image", "image_to_text")
TEXT_LAYERS = 2  # run this many last MiniLM layers per checkpoint (covers recipes unlocking 1 or 2)


def recalls(metrics: dict, direction: str) -> list[float]:
    return [round(float(metrics[f"{direction}_R@{k}"]), 2) for k in KS]


def evaluate(out: Path, ckpt: str, threads: int, model: str = OFFLINE_MODEL) -> dict:
    loaded = load_model(model, ckpt, "cpu")
    splits = {s: read_split_data(out, s) for s in ("train", "val")}
    feats = extract_features(out, loaded, splits, 0, TEXT_LAYERS, workers=min(2, threads), mirror=True)
    row: dict = {"checkpoint": str(ckpt)}
    embedded: dict[str, tuple] = {}
    for mirror in (False, True):
        backend = FeatureBackend(loaded.model, feats, splits, 0, TEXT_LAYERS, torch.device("cpu"), mirror=mirror)
        train_images, train_texts = backend.embed("train")
        images, texts = backend.embed("val")
        sel = {"images": images, "texts": texts, "text_to_image": splits["val"].text_to_image}
        plain = retrieval_metrics(images, texts, sel["text_to_image"], KS)
        tag = "mirror" if mirror else "plain"
        embedded[tag] = (images, texts, train_images, sel)
        row[tag] = {"cosine": {d: recalls(plain, d) for d in DIRECTIONS}, "corrected": {}}
        for direction, bank in (("image_to_text", train_images), ("text_to_image", train_texts)):
            ch = choose(sel, bank, direction, K_GRID, BETAS)
            best = next(t for t in ch["sweep"] if t["beta"] == ch["beta"] and t["k"] == ch["k"])
            row[tag]["corrected"][direction] = {"beta": ch["beta"], "k": ch["k"], "recall": recalls(best, direction)}
        row[tag]["corrected_score"] = round(float(np.mean(
            [v for d in DIRECTIONS for v in row[tag]["corrected"][d]["recall"]])), 3)
    # an uploaded image: embedded plain, against the captions and correction served with mirror
    _, texts, bank, sel = embedded["mirror"]
    c = row["mirror"]["corrected"]["image_to_text"]
    offsets = -c["beta"] * bank_similarity(texts, bank, c["k"])
    up = retrieval_metrics(embedded["plain"][0], texts, sel["text_to_image"], KS, text_offsets=offsets)
    row["uploaded_query_i2t"] = recalls(up, "image_to_text")
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="a prepare output (splits/, features/)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=OFFLINE_MODEL, help="the checkpoints' model (default: %(default)s)")
    ap.add_argument("checkpoints", nargs="+")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for ckpt in a.checkpoints:
        rows.append(evaluate(a.out, ckpt, a.threads, a.model))
        print(json.dumps(rows[-1]), flush=True)
    print_table(rows)
    return 0


def print_table(rows: list[dict]) -> None:
    """The markdown table of `evaluate` rows: plain and mirror-averaged images per checkpoint."""
    print("\n| checkpoint | images | val T→I corrected | val I→T corrected | score |")
    print("|---|---|---|---|---|")
    for r in rows:
        for tag in ("plain", "mirror"):
            c = r[tag]["corrected"]
            cells = [" / ".join(f"{v:.2f}" for v in c[d]["recall"]) + f" (β {c[d]['beta']}, k {c[d]['k']})"
                     for d in DIRECTIONS]
            print(f"| {Path(r['checkpoint']).name} | {tag} | {cells[0]} | {cells[1]} | {r[tag]['corrected_score']} |")
        if "uploaded_query_i2t" in r:  # once per checkpoint, after both rows
            up = " / ".join(f"{v:.2f}" for v in r["uploaded_query_i2t"])
            print(f"| {Path(r['checkpoint']).name} | uploaded query (plain) vs mirror gallery | | {up} | |")


if __name__ == "__main__":
    raise SystemExit(main())
