"""The `evaluate` stage: Recall@1/5/10, median and mean rank in both directions, by exact search and
through the HNSW indexes, written to `<out>/results/recall_<split>.json` and appended to
`<out>/results/results_log.jsonl`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


from clipsearch.artifacts import ArtifactLayout
from clipsearch.index import VectorIndex
from clipsearch.manifest import ArtifactError, now_iso, write_json_atomic
from clipsearch.recall import KS, retrieval_metrics
from offline.embed import load_embeddings
from offline.index import index_dir


def evaluate(out: Path, split: str, tag: str | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    emb = load_embeddings(out, split)
    text_to_image = emb["text_to_image"]

    idir = index_dir(out, split)
    img_idx = VectorIndex.load(idir / "images.hnsw.json")
    txt_idx = VectorIndex.load(idir / "texts.hnsw.json")
    for idx in (img_idx, txt_idx):
        if idx.manifest.get("embeddings_manifest_sha256") != emb["manifest_sha256"]:
            raise ArtifactError(f"index for split '{split}' was built from other embeddings; run the index stage")
    # exact search ranks captions and images exactly as their indexes do: with their offsets, if any
    offsets = txt_idx.offsets() if txt_idx.has_offsets else None
    img_offsets = img_idx.offsets() if img_idx.has_offsets else None
    exact = retrieval_metrics(emb["images"], emb["texts"], text_to_image, KS, text_offsets=offsets,
                              image_offsets=img_offsets)
    extra: dict[str, Any] = {}
    if offsets is not None or img_offsets is not None:
        raw = retrieval_metrics(emb["images"], emb["texts"], text_to_image, KS)
        corrected = (("image_to_text",) if offsets is not None else ()) + \
            (("text_to_image",) if img_offsets is not None else ())
        extra["without_hubness_correction"] = {k: v for k, v in raw.items() if k.startswith(corrected)}
    hnsw = retrieval_metrics(
        emb["images"], emb["texts"], text_to_image, KS,
        search_images=lambda q, k: img_idx.search(q, k)[1],
        search_texts=lambda q, k: txt_idx.search(q, k)[1],
    )
    record = {
        "split": split,
        **exact,
        "hnsw": hnsw,
        "hubness": txt_idx.manifest.get("hubness"),
        "hubness_images": img_idx.manifest.get("hubness"),
        **extra,
        "counts": {"images": len(emb["images"]), "texts": len(emb["texts"])},
        "model": emb["manifest"]["model"],
        "index": {"kind": "hnsw", "params": img_idx.manifest["params"],
                  "images_index_sha256": img_idx.manifest.get("index_sha256"),
                  "texts_index_sha256": txt_idx.manifest.get("index_sha256")},
        "embeddings_manifest_sha256": emb["manifest_sha256"],
        "note": "top-level R@K are exact (flat) search; 'hnsw' is the same metric through the HNSW indexes; "
                "image->text ranks captions as the served caption index does, with the hubness correction "
                "when 'hubness' is set, text->image ranks images with theirs when 'hubness_images' is set "
                "('without_hubness_correction' then gives the plain cosine ranking of each corrected direction)",
        "tag": tag,
        "created": now_iso(),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    res_dir = ArtifactLayout(out).results_dir
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
    raw = record.get("without_hubness_correction") or {}
    for d, short, hub_key, sym, bank_of in (("text_to_image", "T→I", "hubness_images", "r_i", "captions"),
                                            ("image_to_text", "I→T", "hubness", "r_c", "images")):
        if f"{d}_R@1" not in raw:
            continue
        lines.append(f"{short + ' raw cos':16}" + "".join(f"{raw[f'{d}_R@{k}']:>8.2f}" for k in KS)
                     + f"{raw[f'{d}_median_rank']:>7}{raw[f'{d}_mean_rank']:>8}")
        hub = record[hub_key]
        lines.append(f"({short} ranks by cos − {hub['beta']:g}·{sym}, {sym} from {hub['bank_count']} "
                     f"{hub['bank_split']} {bank_of}, k={hub['k']}; 'raw cos' is without that correction)")
    return "\n".join(lines)
