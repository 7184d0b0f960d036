"""The `evaluate` stage: Recall@1/5/10, median and mean rank in both directions, by exact search and
through the HNSW indexes, written to `<out>/results/recall_<split>.json` and appended to
`<out>/results/results_log.jsonl`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.index import VectorIndex
from clipsearch.manifest import ArtifactError, now_iso, write_json_atomic
from clipsearch.recall import KS, retrieval_metrics
from offline.embed import load_embeddings
from offline.index import index_dir


def evaluate(out: Path, split: str, tag: str | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    emb = load_embeddings(out, split)
    id_of_image = {r["image_id"]: i for i, r in enumerate(emb["image_records"])}
    text_to_image = np.array([id_of_image[r["image_id"]] for r in emb["text_records"]], dtype=np.int64)
    exact = retrieval_metrics(emb["images"], emb["texts"], text_to_image, KS)

    idir = index_dir(out, split)
    img_idx = VectorIndex.load(idir / "images.hnsw.json")
    txt_idx = VectorIndex.load(idir / "texts.hnsw.json")
    for idx in (img_idx, txt_idx):
        if idx.manifest.get("embeddings_manifest_sha256") != emb["manifest_sha256"]:
            raise ArtifactError(f"index for split '{split}' was built from other embeddings; run the index stage")
    hnsw = retrieval_metrics(
        emb["images"], emb["texts"], text_to_image, KS,
        search_images=lambda q, k: img_idx.search(q, k)[1],
        search_texts=lambda q, k: txt_idx.search(q, k)[1],
    )
    record = {
        "split": split,
        **exact,
        "hnsw": hnsw,
        "counts": {"images": len(emb["images"]), "texts": len(emb["texts"])},
        "model": emb["manifest"]["model"],
        "index": {"kind": "hnsw", "params": img_idx.manifest["params"],
                  "images_index_sha256": img_idx.manifest.get("index_sha256"),
                  "texts_index_sha256": txt_idx.manifest.get("index_sha256")},
        "embeddings_manifest_sha256": emb["manifest_sha256"],
        "note": "top-level R@K are exact (flat) search; 'hnsw' is the same metric through the HNSW indexes",
        "tag": tag,
        "created": now_iso(),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    res_dir = Path(out) / "results"
    write_json_atomic(res_dir / f"recall_{split}.json", record)
    res_dir.mkdir(parents=True, exist_ok=True)
    with open(res_dir / "results_log.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    return record


def format_table(record: dict[str, Any]) -> str:
    lines = [f"{'':16}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'medR':>7}{'meanR':>8}"]
    for label, src in (("exact", record), ("hnsw", record["hnsw"])):
        for d, short in (("text_to_image", "T→I"), ("image_to_text", "I→T")):
            med = src[f"{d}_median_rank"]
            mean = src[f"{d}_mean_rank"]
            lines.append(f"{short + ' ' + label:16}" + "".join(f"{src[f'{d}_R@{k}']:>8.2f}" for k in KS)
                         + f"{med if med is not None else '-':>7}{mean if mean is not None else '-':>8}")
    return "\n".join(lines)
