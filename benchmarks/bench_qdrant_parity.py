"""Does a collection served from Qdrant answer like the same collection served from FAISS?

    PYTHONPATH=. python benchmarks/bench_qdrant_parity.py --artifacts artifacts --collection flickr8k \
        --work /tmp/qdrant-parity --out benchmarks/results/qdrant_parity.json

Copies the collection's folder (catalog + FAISS snapshot) under --work (the source stays untouched),
migrates it to a Qdrant local-mode store there with `offline migrate` (timed: the honest local-mode
upsert cost), then asks both stores the same queries:
  text -> image   the first caption of each official test image (its vector from the catalog, so no
                  model runs), target images, k=10, unfiltered and with the filter {"split": "test"};
  image -> text   the test images' vectors, target captions (hubness offsets included), k=10.
For each: the share of queries whose top-10 equals FAISS's in order ("exact"), as a set ("set"), and
the mean overlap, plus per-query latency of each store. FAISS searches images exactly (8,091 <
EXACT_MAX) and captions through HNSW (40,455 > EXACT_MAX); Qdrant's local mode is brute force, so the
image -> text comparison is also run against FAISS forced exact (exact_max above the caption count).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import finish, log, machine_env  # noqa: E402
from clipsearch.artifacts import ArtifactLayout  # noqa: E402
from clipsearch.store import Catalog, FaissStore  # noqa: E402
from clipsearch.store.qdrant_store import QdrantLocation, QdrantStore  # noqa: E402
from offline.migrate import migrate  # noqa: E402


def compare(a: list[list[str]], b: list[list[str]]) -> dict[str, float]:
    exact = np.mean([x == y for x, y in zip(a, b)])
    same_set = np.mean([set(x) == set(y) for x, y in zip(a, b)])
    overlap = np.mean([len(set(x) & set(y)) / max(1, len(x)) for x, y in zip(a, b)])
    return {"queries": len(a), "top10_equal_ordered": round(float(exact), 4),
            "top10_equal_as_set": round(float(same_set), 4), "mean_overlap@10": round(float(overlap), 4)}


def run(store, queries: np.ndarray, target: str, key, **kw) -> tuple[list[list[str]], list[float]]:
    out, ms = [], []
    for q in queries:
        t = time.perf_counter()
        hits = store.search(q, 10, target=target, **kw)
        ms.append((time.perf_counter() - t) * 1000)
        out.append([key(h) for h in hits])
    return out, ms


def pct(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, required=True, help="ARTIFACTS_DIR holding the collection (read only)")
    ap.add_argument("--collection", default="flickr8k")
    ap.add_argument("--work", type=Path, required=True, help="where the copy and the Qdrant store go")
    ap.add_argument("--split", default="test", help="metadata split whose images give the queries")
    ap.add_argument("--max-queries", type=int, default=1000)
    ap.add_argument("--filtered-queries", type=int, default=100,
                    help="queries of the filtered case (local mode filters in Python, ~0.5 s a query)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    env = machine_env(1)
    import faiss

    faiss.omp_set_num_threads(1)
    src = ArtifactLayout(args.artifacts).collection(args.collection)
    root = args.work / "artifacts"
    dst = ArtifactLayout(root).collection(args.collection)
    if not dst.catalog.is_file():
        log(f"copying {src.dir} -> {dst.dir}")
        dst.dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src.dir, dst.dir, ignore=shutil.ignore_patterns("*-shm", "*-wal"))
    spec = f"qdrant:{args.work / 'qdrant'}"
    first_record = args.work / "first_migrate.json"
    t = time.perf_counter()
    first = migrate(str(root), args.collection, spec)
    migrate_s = time.perf_counter() - t
    log(f"migrate: {first}")
    if first["up_to_date"] and first_record.is_file():  # copied by an earlier run: keep its timing
        first, migrate_s = json.loads(first_record.read_text()), None
    else:
        first_record.write_text(json.dumps({**first, "wall_seconds": migrate_s}))
    t = time.perf_counter()
    again = migrate(str(root), args.collection, spec)
    rerun_s = time.perf_counter() - t

    with Catalog(dst.catalog, readonly=True) as cat:
        rows = cat.rows()
    test_rows = [i for i, m in enumerate(rows.metadata) if m.get("split") == args.split][: args.max_queries]
    first_caption: dict[int, int] = {}
    for c, r in enumerate(rows.caption_image_rows):
        first_caption.setdefault(int(r), c)
    text_q = rows.caption_vectors[[first_caption[r] for r in test_rows]]
    image_q = rows.vectors[test_rows]
    log(f"{len(test_rows)} queries from split {args.split!r}")

    faiss_store = FaissStore.open(dst, readonly=True)
    faiss_exact = FaissStore.open(dst, readonly=True, exact_max=10 ** 9)
    t = time.perf_counter()
    qdrant = QdrantStore.open(QdrantLocation(path=str(args.work / "qdrant")), args.collection)
    qdrant.count()
    open_s = time.perf_counter() - t
    image_key = lambda h: h.image_id  # noqa: E731
    caption_key = lambda h: h.caption_id  # noqa: E731
    cases = {
        "text_to_image": (text_q, "images", image_key, {}),
        "text_to_image_filtered": (text_q[: args.filtered_queries], "images", image_key,
                                   {"filter": {"split": args.split}}),
        "image_to_text": (image_q, "captions", caption_key, {}),
    }
    results = {}
    for name, (queries, target, key, kw) in cases.items():
        fa, fa_ms = run(faiss_store, queries, target, key, **kw)
        qd, qd_ms = run(qdrant, queries, target, key, **kw)
        rec = {"vs_faiss_served": compare(fa, qd), "faiss_latency": pct(fa_ms), "qdrant_local_latency": pct(qd_ms)}
        if target == "captions":
            ex, ex_ms = run(faiss_exact, queries, target, key, **kw)
            rec["vs_faiss_exact"] = compare(ex, qd)
            rec["faiss_hnsw_vs_faiss_exact"] = compare(ex, fa)
        results[name] = rec
        log(f"{name}: {rec}")
    for s in (faiss_store, faiss_exact, qdrant):
        s.close()

    result = {"bench": "qdrant_parity", "env": env, "collection": args.collection,
              "images": first["images"], "captions": first["captions"],
              "migrate_seconds": round(first.get("wall_seconds", migrate_s or 0), 1),
              "migrate_points_per_s": round((first["images"] + first["captions"]) / first.get("wall_seconds", migrate_s or 1), 1),
              "migrate_rerun_seconds": round(rerun_s, 2), "migrate_rerun_up_to_date": again["up_to_date"],
              "qdrant_local_open_seconds": round(open_s, 1), "cases": results}
    lines = [f"{'case':24} {'vs':14} {'ordered':>8} {'as set':>8} {'overlap':>8} {'faiss p50':>10} {'qdrant p50':>11}"]
    for name, rec in results.items():
        for vs in ("vs_faiss_served", "vs_faiss_exact"):
            if vs in rec:
                c = rec[vs]
                lines.append(f"{name:24} {vs[3:]:14} {c['top10_equal_ordered']:8.4f} {c['top10_equal_as_set']:8.4f} "
                             f"{c['mean_overlap@10']:8.4f} {rec['faiss_latency']['p50_ms']:10.2f} "
                             f"{rec['qdrant_local_latency']['p50_ms']:11.2f}")
    lines.append(f"migrate {result['images']} images + {result['captions']} captions: {result['migrate_seconds']} s "
                 f"({result['migrate_points_per_s']} points/s); rerun {result['migrate_rerun_seconds']} s")
    finish(result, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
