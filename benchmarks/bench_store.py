"""Vector stores side by side on one workload: ingest/s, recall@10 vs exact, p50/p99 at batch 1, memory.

    PYTHONPATH=. python benchmarks/bench_store.py --n 100000 --qdrant-n 10000 --out benchmarks/results/store_100k.json
    PYTHONPATH=. python benchmarks/bench_store.py --mode codecs --n 1000000 --out benchmarks/results/codecs_1m.json
    PYTHONPATH=. python benchmarks/bench_store.py --mode codecs --real ART/collections/flickr8k/catalog.sqlite

The workload: a synthetic clustered set (`--clusters` Gaussian clusters on the unit sphere, 512-d,
L2-normalised; queries drawn from the same clusters, not from the data), inner product.

`--mode store` (the default) runs
  faiss Flat             exact search (the ground truth, and what FaissStore does below EXACT_MAX);
  faiss HNSW-Flat        what FaissStore builds above EXACT_MAX (M=16, efConstruction=200, efSearch=100);
  faiss HNSW-SQ8         the same graph over 8-bit scalar-quantised vectors (4x smaller vectors);
  faiss IVF-PQ + SQ8 re-rank  IVF (nlist) with 64-byte PQ codes, the top candidates re-ranked on SQ8 codes;
  qdrant local           qdrant-client's local mode on the first `--qdrant-n` vectors (its inserts are
                         ~6-20 ms a point, so 100k would take hours): a Python brute-force scan, so its
                         recall is 1 by construction and its latency says nothing about a Qdrant server.
Memory is the serialised index size per vector for FAISS (what it holds in RAM, the graph included)
and the growth of this process's resident memory for Qdrant local mode.

`--mode codecs` measures, at `--n` (1M for docs/scaling.md), the bytes per vector and recall@10 of
the codes alone, each scanned in full so no index structure adds misses: fp32, SQ8 (8-bit scalar),
PQ64 and PQ32 (64 / 32 bytes: 8-bit product quantisation), and PQ64 re-ranked on SQ8 codes. Exact
search is the truth. No HNSW graph is built there: its cost is measured at 100k by `--mode store`,
~`M*2*4` bytes of links per vector on top of the codes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import finish, log, machine_env  # noqa: E402
from clipsearch.index import recall_vs_exact  # noqa: E402


def clustered(n: int, centers: np.ndarray, seed: int, spread: float = 1.0) -> np.ndarray:
    """n points around random `centers` (chosen uniformly; noise of norm ~`spread`), L2-normalised."""
    rng = np.random.default_rng(seed)
    dim = centers.shape[1]
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        x = centers[rng.integers(0, len(centers), m)] + spread / np.sqrt(dim) * rng.standard_normal((m, dim)).astype(np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def data(n: int, nq: int, dim: int, clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """The data and the queries: the same clusters, independent draws."""
    rng = np.random.default_rng(12345)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    return clustered(n, centers, seed=1), clustered(nq, centers, seed=2)


def exact_top(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index.search(q, k)[1]


def latencies(search, q: np.ndarray, k: int) -> tuple[np.ndarray, list[float]]:
    ids, ms = [], []
    for v in q:
        t = time.perf_counter()
        ids.append(search(v[None, :], k))
        ms.append((time.perf_counter() - t) * 1000)
    return np.vstack(ids), ms


def rec(name: str, n: int, build_s: float, nbytes: int, ids: np.ndarray, truth: np.ndarray, ms: list[float],
        **extra) -> dict:
    r = {"name": name, "n": n, "ingest_per_s": round(n / build_s, 1), "build_seconds": round(build_s, 2),
         "bytes_per_vector": round(nbytes / n, 1), "recall@10": round(recall_vs_exact(ids, truth), 4),
         "p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3), **extra}
    log(str(r))
    return r


TRAIN_MAX = 50_000  # vectors an IVF / PQ / SQ codec is trained on (a sample)


BUILD_THREADS = 1  # --build-threads: building may use more threads; every search runs on one


def faiss_variant(name: str, x: np.ndarray, q: np.ndarray, truth: np.ndarray, k: int, make, tune=None,
                  tunes: dict | None = None) -> list[dict]:
    """Build once, then measure each operating point (`tunes`: label suffix -> tune), batch 1, 1 thread."""
    faiss.omp_set_num_threads(BUILD_THREADS)
    t = time.perf_counter()
    index = make(x.shape[1])
    if not index.is_trained:
        rng = np.random.default_rng(0)
        index.train(x[np.sort(rng.choice(len(x), min(len(x), TRAIN_MAX), replace=False))])
    index.add(x)
    build = time.perf_counter() - t
    faiss.omp_set_num_threads(1)
    nbytes = len(faiss.serialize_index(index))

    def search(v, kk):
        return index.search(v, kk)[1]

    out = []
    for suffix, fn in (tunes or {"": tune}).items():
        if fn:
            fn(index)
        ids, ms = latencies(search, q, k)
        out.append(rec(name + suffix, len(x), build, nbytes, ids, truth, ms, build_threads=BUILD_THREADS))
    return out


def hnsw(m: int, sq8: bool):
    def make(d: int):
        index = (faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_8bit, m, faiss.METRIC_INNER_PRODUCT) if sq8
                 else faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT))
        index.hnsw.efConstruction = 200
        return index
    return make


def set_ef(ef: int):
    def tune(index):
        index.hnsw.efSearch = ef
    return tune


def ivfpq(nlist: int, pq_m: int, refine_sq8: bool):
    def make(d: int):
        base = faiss.index_factory(d, f"IVF{nlist},PQ{pq_m}", faiss.METRIC_INNER_PRODUCT)
        if not refine_sq8:
            return base
        return faiss.IndexRefine(base, faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit,
                                                                 faiss.METRIC_INNER_PRODUCT))
    return make


def pq(pq_m: int, refine_sq8: bool):
    """Flat PQ (every code scanned with lookup tables): the codes' recall without an IVF's misses."""
    def make(d: int):
        base = faiss.IndexPQ(d, pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        if not refine_sq8:
            return base
        return faiss.IndexRefine(base, faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit,
                                                                 faiss.METRIC_INNER_PRODUCT))
    return make


def set_k_factor(k_factor: float):
    def tune(index):
        faiss.downcast_index(index).k_factor = k_factor
    return tune


def set_nprobe(nprobe: int, k_factor: float | None = None):
    def tune(index):
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = nprobe
        if k_factor is not None:
            faiss.downcast_index(index).k_factor = k_factor
    return tune


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def qdrant_local(x: np.ndarray, q: np.ndarray, truth: np.ndarray, k: int, m: int, batch: int = 256) -> dict:
    from qdrant_client import QdrantClient, models

    with tempfile.TemporaryDirectory() as folder:
        before = rss_kib()
        client = QdrantClient(path=folder)
        client.create_collection("bench", vectors_config=models.VectorParams(size=x.shape[1], distance=models.Distance.DOT),
                                 hnsw_config=models.HnswConfigDiff(m=m, ef_construct=200))
        t = time.perf_counter()
        for start in range(0, len(x), batch):
            client.upsert("bench", [models.PointStruct(id=i, vector=x[i].tolist()) for i in
                                    range(start, min(len(x), start + batch))], wait=True)
            if start and start % (batch * 8) == 0:
                log(f"qdrant local: {start} points, {start / (time.perf_counter() - t):.0f}/s")
        build = time.perf_counter() - t
        grew = (rss_kib() - before) * 1024

        def search(v, kk):
            res = client.query_points("bench", query=v[0].tolist(), limit=kk,
                                      search_params=models.SearchParams(hnsw_ef=100))
            return np.array([[p.id for p in res.points]])

        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ids, ms = latencies(search, q, k)
        client.close()
    return rec("qdrant local mode", len(x), build, grew, ids, truth, ms,
               memory="process RSS growth (Python objects + numpy), not a server's")


def mode_store(args) -> tuple[dict, str]:
    x, q = data(args.n, args.queries, args.dim, args.clusters)
    k = 10
    truth = exact_top(x, q, k)
    efs = {f" ef={ef}": set_ef(ef) for ef in (100, 200)}
    rows = [*faiss_variant("faiss Flat (exact)", x, q, truth, k, faiss.IndexFlatIP),
            *faiss_variant(f"faiss HNSW{args.m}-Flat", x, q, truth, k, hnsw(args.m, False), tunes=efs),
            *faiss_variant(f"faiss HNSW{args.m}-SQ8", x, q, truth, k, hnsw(args.m, True), tunes=efs),
            *faiss_variant(f"faiss IVF{args.nlist}-PQ64 + SQ8 re-rank", x, q, truth, k, ivfpq(args.nlist, 64, True),
                           tunes={" (nprobe 32, x4)": set_nprobe(32, 4), " (nprobe 64, x8)": set_nprobe(64, 8)})]
    if args.qdrant_n:
        xq = x[: args.qdrant_n]
        rows.append(qdrant_local(xq, q, exact_top(xq, q, k), k, args.m))
    return {"rows": rows}, table(rows)


def real_data(catalog: Path, nq: int) -> tuple[np.ndarray, np.ndarray]:
    """Real embeddings: a collection's caption vectors as the data, its image vectors as the queries."""
    from clipsearch.store import Catalog

    with Catalog(catalog, readonly=True) as cat:
        rows = cat.rows()
    rng = np.random.default_rng(0)
    q = rows.vectors[np.sort(rng.choice(len(rows.vectors), min(nq, len(rows.vectors)), replace=False))]
    return np.ascontiguousarray(rows.caption_vectors), np.ascontiguousarray(q)


def mode_codecs(args) -> tuple[dict, str]:
    if args.real:
        x, q = real_data(args.real, args.queries)
        log(f"real embeddings from {args.real}: {x.shape[0]} x {x.shape[1]} captions, {len(q)} image queries")
    else:
        x, q = data(args.n, args.queries, args.dim, args.clusters)
    k = 10
    t = time.perf_counter()
    truth = exact_top(x, q, k)
    log(f"ground truth in {time.perf_counter() - t:.1f} s")
    sq8 = lambda d: faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)  # noqa: E731
    rows = [*faiss_variant("fp32 (Flat, exact)", x, q, truth, k, faiss.IndexFlatIP),
            *faiss_variant("SQ8 (flat scan of 8-bit codes)", x, q, truth, k, sq8),
            *faiss_variant("PQ64x8 (flat scan of 64-byte codes)", x, q, truth, k, pq(64, False)),
            *faiss_variant("PQ32x8 (flat scan of 32-byte codes)", x, q, truth, k, pq(32, False)),
            *faiss_variant("PQ64x8 + SQ8 re-rank", x, q, truth, k, pq(64, True),
                           tunes={" (top 40)": set_k_factor(4), " (top 100)": set_k_factor(10)})]
    return {"n": len(x), "dim": x.shape[1], "rows": rows}, table(rows)


def table(rows: list[dict]) -> str:
    lines = [f"{'store':58} {'n':>8} {'ingest/s':>10} {'recall@10':>9} {'p50 ms':>8} {'p99 ms':>8} {'B/vector':>9}"]
    for r in rows:
        lines.append(f"{r['name']:58} {r['n']:8d} {r['ingest_per_s']:10.0f} {r['recall@10']:9.4f} "
                     f"{r['p50_ms']:8.3f} {r['p99_ms']:8.3f} {r['bytes_per_vector']:9.1f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("store", "codecs"), default="store")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--real", type=Path, default=None,
                    help="codecs mode on real embeddings: a collection's catalog.sqlite (captions = data, "
                         "images = queries) instead of the synthetic set")
    ap.add_argument("--m", type=int, default=16, help="HNSW M (FaissStore's default)")
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--qdrant-n", type=int, default=10_000, help="vectors for Qdrant local mode; 0 skips it")
    ap.add_argument("--build-threads", type=int, default=1, help="threads for building (searches use 1)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    global BUILD_THREADS
    BUILD_THREADS = args.build_threads
    env = machine_env(1, faiss=faiss.__version__, build_threads=args.build_threads)
    t = time.perf_counter()
    body, tbl = (mode_store if args.mode == "store" else mode_codecs)(args)
    result = {"bench": f"store_{args.mode}", "env": env, "data": str(args.real) if args.real else "synthetic",
              "n": args.n, "dim": args.dim, "clusters": args.clusters,
              "queries": args.queries, "k": 10, "train_max": TRAIN_MAX, **body,
              "seconds": round(time.perf_counter() - t, 1)}
    finish(result, tbl, args.out)


if __name__ == "__main__":
    main()
