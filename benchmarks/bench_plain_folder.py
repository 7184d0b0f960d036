"""A plain folder of photos (no captions) ingested with the built model: is it searchable?

    python benchmarks/bench_plain_folder.py --artifacts ARTIFACTS --data ../shared/flickr8k --split test

Copies the split's images into a plain folder (no captions, no split lists), times `offline ingest`
on it, a re-ingest with nothing changed, and one after adding 10 / touching 10 / removing 10 files;
then measures, through the served path (decode + encode the file, search the collection):
image → image rank-1 self-retrieval (the query embedded plain, as a search does, and, for a model
with image_tta, also as the collection stores it), and text → image R@1/5/10 with the split's real captions as
queries (which `offline evaluate` also measures on the same images: the two should agree). Prints
JSON and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _ingest(folder: Path, art: Path) -> tuple[float, dict]:
    t = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "offline", "ingest", str(folder), "--out", str(art),
                          "--collection", "plain"], cwd=REPO, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(run.stderr[-3000:])
    out = run.stdout
    return time.perf_counter() - t, json.loads(out[out.index("{\n"):])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", type=Path, required=True, help="a built ARTIFACTS_DIR (model.json)")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("CLIPSEARCH_FLICKR8K") or REPO.parent / "shared" / "flickr8k"),
                    help="a Flickr8k copy (default: $CLIPSEARCH_FLICKR8K, else ../shared/flickr8k beside the repository)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--work", type=Path, default=Path("/tmp/clipsearch-plain"))
    args = ap.parse_args()

    from clipsearch.artifacts import ArtifactLayout
    from clipsearch.encoder import ClipEncoder, image_backend_for, text_backend_for
    from clipsearch.images import decode_image
    from clipsearch.manifest import read_json
    from clipsearch.models import load_model
    from clipsearch.store import open_store
    from offline.layouts import read_list, resolve_layout

    layout = resolve_layout(args.data)
    ids = read_list(layout.split_lists[args.split])
    captions: dict[str, list[str]] = {}
    for line in layout.caption_file.read_text(encoding="utf-8").splitlines():
        key, _, text = line.partition("\t")
        captions.setdefault(key.rsplit("#", 1)[0], []).append(" ".join(text.split()))
    shutil.rmtree(args.work, ignore_errors=True)
    folder = args.work / "photos"
    folder.mkdir(parents=True)
    for i in ids:
        shutil.copy2(layout.image_dir / i, folder / i)
    art = args.work / "art"
    art.mkdir()
    for name in ("model.json", "models", "hubness", "embeddings"):
        src = args.artifacts / name
        if src.exists():
            (art / name).symlink_to(src.resolve())

    first_s, first = _ingest(folder, art)
    again_s, again = _ingest(folder, art)
    extra = [i for i in captions if i not in set(ids)][:10]
    for i in extra:
        shutil.copy2(layout.image_dir / i, folder / i)
    for i in ids[:10]:
        os.utime(folder / i)
    for i in ids[10:20]:
        (folder / i).unlink()
    change_s, change = _ingest(folder, art)
    for i in ids[10:20]:
        shutil.copy2(layout.image_dir / i, folder / i)
    for i in extra:
        (folder / i).unlink()
    _ingest(folder, art)

    rec = read_json(art / "model.json")
    loaded = load_model(rec["model"], rec["pretrained"], "cpu", checkpoint_sha256=rec.get("checkpoint_sha256"))
    threads = os.cpu_count() or 1
    enc = ClipEncoder(loaded, text_backend=text_backend_for(loaded, "onnx", art / "onnx", threads),
                      image_backend=image_backend_for(loaded, "onnx", art / "onnx", threads))
    store = open_store(ArtifactLayout(art), "plain")
    t = time.perf_counter()
    self_hits, self_hits_tta = 0, 0
    tta = bool(rec.get("image_tta"))
    for i in ids:
        image = decode_image(folder / i)
        vec = enc.encode_images([image], tta=False)[0]  # as /search/image embeds a query: plain, once
        self_hits += store.search(vec, 1)[0].image_id == i
        if tta:  # and as CLIPSEARCH_QUERY_IMAGE_TTA=1 would: the way the collection stores it
            self_hits_tta += store.search(enc.encode_images([image])[0], 1)[0].image_id == i
    i2i_s = time.perf_counter() - t
    queries = [(i, c) for i in ids for c in captions.get(i, [])]
    vecs = np.concatenate([enc.encode_texts([c for _, c in queries[j:j + 64]]) for j in range(0, len(queries), 64)])
    ranks = []
    for (i, _), v in zip(queries, vecs):
        hits = [h.image_id for h in store.search(v, 10)]
        ranks.append(hits.index(i) + 1 if i in hits else 11)
    ranks = np.array(ranks)
    result = {
        "images": store.count(), "captions_in_collection": store.count("captions"),
        "ingest_seconds": round(first_s, 1), "ingest_embedded": first["embedded"],
        "reingest_unchanged_seconds": round(again_s, 1), "reingest_unchanged": again["unchanged"],
        "reingest_after_change_seconds": round(change_s, 1),
        "reingest_after_change": {k: change[k] for k in ("new", "changed", "removed", "unchanged", "embedded")},
        "image_to_image_self_rank1": round(100 * self_hits / len(ids), 2),
        **({"image_to_image_self_rank1_query_tta": round(100 * self_hits_tta / len(ids), 2)} if tta else {}),
        "text_queries": len(queries),
        **{f"text_to_image_R@{k}": round(100 * float((ranks <= k).mean()), 2) for k in (1, 5, 10)},
        "model": rec, "machine": f"{os.cpu_count()} cores",
    }
    print(json.dumps(result, indent=2))
    print(f"\n| measure | value |\n|---|---|")
    for k, v in result.items():
        if k not in ("model",):
            print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
