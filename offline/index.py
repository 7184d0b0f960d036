"""The `index` stage: HNSW and exact flat indexes for a split's images and captions, plus an
efSearch sweep (recall@10 against exact search, and ms/query) written as JSON and a PNG plot.

Files (`<out>/indexes/<split>/`): `{images,texts}.{hnsw,flat}.json` manifests beside their
content-named `.faiss` files (see `clipsearch.index`). Each manifest names the model and the hash
of the embeddings manifest, which is what the service checks before it serves a pair. When the
hubness stage has chosen a β > 0 for this model (`offline/hubness.py`), both caption indexes carry
each caption's offset −β·r_c and their manifests say so under "hubness"; the same for the image
indexes and the text → image correction (−β·r_i).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.artifacts import ArtifactLayout
from clipsearch.index import IndexParams, VectorIndex, recall_vs_exact
from clipsearch.manifest import ArtifactError, read_json, write_json_atomic
from offline.embed import load_embeddings
from offline.plots import plot_ef_sweep

log = logging.getLogger(__name__)

SWEEP_EF = (8, 16, 32, 64, 100, 128, 256, 512)
KINDS = ("hnsw", "flat")
TARGETS = ("images", "texts")


def index_dir(out: Path, split: str) -> Path:
    return ArtifactLayout(out).indexes_dir(split)


def _up_to_date(path: Path, emb_sha: str, params: IndexParams, hubness: dict[str, Any] | None) -> bool:
    try:
        m = read_json(path)
    except ArtifactError:
        return False
    return (m.get("embeddings_manifest_sha256") == emb_sha and m.get("params") == asdict(params)
            and m.get("hubness") == hubness and (path.parent / m.get("index_file", "")).is_file())


def build_indexes(out: Path, split: str, params: IndexParams, force: bool = False,
                  sweep: bool = True, hubness: bool = True) -> dict[str, Any]:
    """`hubness=False` ignores the hubness stage's β and builds plain caption indexes."""
    from clipsearch.hubness import Banks
    from offline.hubness import offsets_for_split

    t0 = time.perf_counter()
    emb = load_embeddings(out, split)
    idir = index_dir(out, split)
    extra = {"model": emb["manifest"]["model"], "split": split,
             "embeddings_manifest_sha256": emb["manifest_sha256"],
             "data_sha256": emb["manifest"]["data_sha256"]}
    model = emb["manifest"]["model"]
    corrections: dict[str, tuple[Any, Any]] = {"texts": (None, None), "images": (None, None)}
    if hubness:
        banks = functools.cache(lambda: Banks.load(out, model))  # read once, and only if a correction applies
        corrections = {"texts": offsets_for_split(out, split, emb["texts"], model, load_banks=banks),
                       "images": offsets_for_split(out, split, emb["images"], model, gallery="images",
                                                   load_banks=banks)}
    built, timings = {}, {}
    for target in TARGETS:
        for kind in KINDS:
            p = IndexParams(kind=kind, m=params.m, ef_construction=params.ef_construction,
                            ef_search=params.ef_search) if kind == "hnsw" else IndexParams(kind="flat")
            name = f"{target}.{kind}"
            offsets, hub = corrections[target]
            if not force and _up_to_date(idir / f"{name}.json", emb["manifest_sha256"], p, hub):
                log.info("index[%s]: %s up to date, reused", split, name)
                built[name] = "reused"
                continue
            idx = VectorIndex.build(emb[target], p, offsets=offsets if hub else None,
                                    **extra, **({"hubness": hub} if hub else {}))
            idx.save(idir, name)
            built[name] = "built"
            timings[f"{name}_build_seconds"] = idx.manifest["build_seconds"]
    result: dict[str, Any] = {"split": split, "dir": str(idir), "indexes": built, **timings,
                              "hubness": corrections["texts"][1], "hubness_images": corrections["images"][1]}
    if sweep:
        result["sweep"] = run_sweep(out, split, emb)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def _time_search(index: VectorIndex, queries: np.ndarray, k: int, ef: int | None) -> tuple[np.ndarray, float]:
    index.search(queries[:16], k, ef_search=ef)  # warm-up
    t = time.perf_counter()
    _, ids = index.search(queries, k, ef_search=ef)
    return ids, (time.perf_counter() - t) * 1000 / len(queries)


def run_sweep(out: Path, split: str, emb: dict[str, Any] | None = None, k: int = 10,
              ef_values: tuple[int, ...] = SWEEP_EF) -> dict[str, Any]:
    """Recall@k of HNSW against exact search, and ms/query, for each efSearch (both directions)."""
    emb = emb or load_embeddings(out, split)
    idir = index_dir(out, split)
    rows = []
    # text queries search the image index; image queries search the caption index
    for target, queries in (("images", emb["texts"]), ("texts", emb["images"])):
        hnsw = VectorIndex.load(idir / f"{target}.hnsw.json")
        flat = VectorIndex.load(idir / f"{target}.flat.json")
        kk = min(k, flat.ntotal)
        exact_ids, flat_ms = _time_search(flat, queries, kk, None)
        for ef in ef_values:
            ids, ms = _time_search(hnsw, queries, kk, ef)
            rows.append({"index": target, "ef_search": ef, f"recall@{kk}": round(recall_vs_exact(ids, exact_ids), 5),
                         "ms_per_query": round(ms, 4), "flat_ms_per_query": round(flat_ms, 4),
                         "n_queries": len(queries), "n_vectors": hnsw.ntotal})
    result = {"split": split, "k": k, "default_ef_search": VectorIndex.load(idir / "images.hnsw.json").params.ef_search,
              "batch": "all queries in one search call", "rows": rows}
    res_dir = ArtifactLayout(out).results_dir
    write_json_atomic(res_dir / f"sweep_{split}.json", result)
    plot_ef_sweep(result, res_dir / f"sweep_{split}.png")
    result["json"] = str(res_dir / f"sweep_{split}.json")
    result["png"] = str(res_dir / f"sweep_{split}.png")
    return result
