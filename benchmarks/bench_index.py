"""Index benchmark: flat vs HNSW, an efSearch sweep, build time and memory.

Two datasets:
  (a) the Flickr8k split's real embeddings, when `--artifacts DIR` holds `embeddings/<split>/`
      (images are the database, captions are the queries, as the service uses them);
  (b) N synthetic 512-d unit vectors (default N=1,000,000) from a mixture of gaussian clusters with a
      decaying noise spectrum, plus held-out queries from the same distribution (see `synthetic`).

For every dataset: recall@k of HNSW against exact (flat) search on the same queries, ms/query at
batch 1 (one query per call) and batched (all queries in one call), build time, serialized index
bytes (faiss.serialize_index) and RSS growth of this process during the build.

The synthetic HNSW index is built incrementally in chunks; at checkpoints (--checkpoints) the sweep is
run on the prefix built so far, so one build reports recall vs N. `--budget-min` stops adding once
the build time passes it (checked after each chunk), and the output says exactly which N was reached with which
parameters (`--ef-construction` can be lowered to reach 1M on a small machine; it is recorded).
The first `--probe` adds of that build give the add rate and the full-build estimate.

    python benchmarks/bench_index.py --artifacts /path/to/artifacts --split test --n 0      # Flickr8k only
    python benchmarks/bench_index.py --n 1000000 --out benchmarks/results/index_1m.json     # synthetic 1M

Prints JSON (and a table on stderr); `--out` writes the JSON, `--plot` a recall-vs-latency PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import finish, log, machine_env, write_json  # noqa: E402
from clipsearch.index import recall_vs_exact  # noqa: E402

SWEEP_EF = (16, 32, 64, 100, 128, 256)
DEFAULT_EF = 100


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def normalize(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def synthetic(n: int, nq: int, d: int = 512, clusters: int = 1000, spread: float = 1.0,
              alpha: float = 1.0, seed: int = 0, chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray, dict]:
    """Unit vectors normalize(center_c + spread * noise), noise_i ~ N(0, s_i^2), s_i^2 ∝ (i+1)^-alpha.

    Centers are random unit directions; cluster sizes follow a Dirichlet(1) draw (uneven, like real
    collections). The noise spectrum decays like a power law (alpha=1: participation ratio ~28 of
    512 dims, an anisotropic space like real embedding spaces; alpha=0.5 gives ~285, close to
    isotropic noise, a much harder stress case where neighbours barely stand out), and a cluster
    still holds points far from its centre (cos to centre ~ 1/sqrt(1+spread^2)). Queries are drawn
    from the same mixture and held out.
    """
    rng = np.random.default_rng(seed)
    centers = normalize(rng.standard_normal((clusters, d)).astype(np.float32))
    weights = rng.dirichlet(np.ones(clusters))
    var = (np.arange(d) + 1.0) ** -alpha
    scale = (spread * np.sqrt(var / var.sum())).astype(np.float32)
    # a fixed random rotation so the noise's principal axes are not the coordinate axes
    rot, _ = np.linalg.qr(rng.standard_normal((d, d)))
    rot = rot.astype(np.float32)

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, d), dtype=np.float32)
        for s in range(0, m, chunk):
            e = min(m, s + chunk)
            lab = rng.choice(clusters, size=e - s, p=weights)
            noise = (rng.standard_normal((e - s, d), dtype=np.float32) * scale) @ rot
            out[s:e] = normalize(centers[lab] + noise)
        return out

    xb = draw(n)
    xq = draw(nq)
    pr = float(var.sum() ** 2 / (var ** 2).sum())
    info = {"n": n, "queries": nq, "dim": d, "clusters": clusters, "spread": spread,
            "noise_spectrum": f"s_i^2 ∝ (i+1)^-{alpha}, randomly rotated", "noise_participation_ratio":
            round(pr, 1), "cluster_sizes": "Dirichlet(1)", "seed": seed}
    return xb, xq, info


def neighbour_stats(d_exact: np.ndarray) -> dict[str, float]:
    """How hard the data is: cosine of the 1st and k-th true neighbour, and the gap between them."""
    return {"cos_nn1_mean": round(float(d_exact[:, 0].mean()), 4),
            "cos_nn10_mean": round(float(d_exact[:, 9].mean()), 4) if d_exact.shape[1] >= 10 else None,
            "cos_nn1_minus_nn10_mean": round(float((d_exact[:, 0] - d_exact[:, -1]).mean()), 4)}


def time_search(search, xq: np.ndarray, k: int, batch1_queries: int, reps: int = 3) -> dict[str, float]:
    """ms/query for one query per call (first `batch1_queries`) and for all queries in one call."""
    search(xq[:8], k)  # warm-up
    b1, bb = [], []
    for _ in range(reps):
        t = time.perf_counter()
        for i in range(batch1_queries):
            search(xq[i:i + 1], k)
        b1.append((time.perf_counter() - t) * 1000 / batch1_queries)
        t = time.perf_counter()
        search(xq, k)
        bb.append((time.perf_counter() - t) * 1000 / len(xq))
    return {"ms_per_query_batch1": round(float(np.median(b1)), 4),
            "ms_per_query_batched": round(float(np.median(bb)), 4),
            "batch1_queries_timed": batch1_queries, "batched_size": len(xq), "reps": reps}


def hnsw_sweep(index: faiss.IndexHNSWFlat, xq: np.ndarray, gt: np.ndarray, k: int,
               efs: tuple[int, ...], batch1_queries: int) -> list[dict[str, Any]]:
    rows = []
    for ef in efs:
        params = faiss.SearchParametersHNSW(efSearch=max(ef, k))

        def search(q, kk, params=params):
            return index.search(q, kk, params=params)

        _, ids = search(xq, k)
        row = {"ef_search": ef, "recall_at_k": round(recall_vs_exact(ids, gt), 4)}
        row.update(time_search(search, xq, k, batch1_queries))
        rows.append(row)
    return rows


def flat_point(xb: np.ndarray, xq: np.ndarray, k: int, batch1_queries: int, threads: int
               ) -> tuple[dict, np.ndarray, np.ndarray]:
    """Exact search: timings, and the ground truth (scores, ids) for the recall of the others.

    One query per call is timed with 1 thread and with `threads`; the faster one is the baseline
    (on a loaded machine OpenMP's barrier can make the 2-thread scan of one query slower).
    """
    rss0 = rss_bytes()
    t = time.perf_counter()
    flat = faiss.IndexFlatIP(xb.shape[1])
    flat.add(xb)
    build = time.perf_counter() - t
    row: dict[str, Any] = {"build_seconds": round(build, 3), "rss_growth_bytes": rss_bytes() - rss0,
                           "index_bytes": serialized_bytes(flat) if flat.ntotal <= 200_000
                           else int(flat.ntotal) * flat.d * 4}
    row.update(time_search(lambda q, kk: flat.search(q, kk), xq, k, batch1_queries))
    if threads > 1:
        faiss.omp_set_num_threads(1)
        one = time_search(lambda q, kk: flat.search(q, kk), xq[:max(batch1_queries, 8)], k, batch1_queries)
        faiss.omp_set_num_threads(threads)
        row["ms_per_query_batch1_threads"] = {"1": one["ms_per_query_batch1"],
                                              str(threads): row["ms_per_query_batch1"]}
        row["ms_per_query_batch1"] = min(one["ms_per_query_batch1"], row["ms_per_query_batch1"])
    d_ex, gt = flat.search(xq, k)
    return row, d_ex, gt


def serialized_bytes(index: faiss.Index) -> int:
    return int(faiss.serialize_index(index).size)


def bench_dataset(name: str, xb: np.ndarray, xq: np.ndarray, k: int, m: int, efc: int,
                  efs: tuple[int, ...], b1_hnsw: int, b1_flat: int) -> dict[str, Any]:
    """Flat + one HNSW build + sweep on a dataset that fits a short run (Flickr8k-sized)."""
    flat_row, d_ex, gt = flat_point(xb, xq, k, b1_flat, faiss.omp_get_max_threads())
    rss0 = rss_bytes()
    t = time.perf_counter()
    idx = faiss.IndexHNSWFlat(xb.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    idx.hnsw.efConstruction = efc
    idx.add(xb)
    build = time.perf_counter() - t
    res = {"dataset": name, "n": int(xb.shape[0]), "queries": int(xq.shape[0]), "dim": int(xb.shape[1]),
           "k": k, "difficulty": neighbour_stats(d_ex), "flat": flat_row,
           "hnsw": {"M": m, "ef_construction": efc, "build_seconds": round(build, 3),
                    "add_rate_per_s": round(xb.shape[0] / build, 1),
                    "rss_growth_bytes": rss_bytes() - rss0, "index_bytes": serialized_bytes(idx),
                    "sweep": hnsw_sweep(idx, xq, gt, k, efs, b1_hnsw)}}
    res["at_default_ef"] = summary(res["hnsw"]["sweep"], flat_row)
    return res


def summary(sweep: list[dict], flat_row: dict) -> dict[str, Any]:
    row = next((r for r in sweep if r["ef_search"] == DEFAULT_EF), None)
    if row is None:
        return {}
    return {"ef_search": DEFAULT_EF, "recall_at_k": row["recall_at_k"],
            "speedup_vs_flat_batch1": round(flat_row["ms_per_query_batch1"] / row["ms_per_query_batch1"], 1),
            "speedup_vs_flat_batched": round(flat_row["ms_per_query_batched"] / row["ms_per_query_batched"], 1)}


def flickr(artifacts: Path, split: str, args) -> dict[str, Any]:
    from offline.embed import load_embeddings

    emb = load_embeddings(artifacts, split)
    xb = np.ascontiguousarray(emb["images"], dtype=np.float32)
    xq = np.ascontiguousarray(emb["texts"], dtype=np.float32)
    res = bench_dataset(f"flickr8k-{split} (images <- caption queries)", xb, xq, args.k, args.m,
                        args.ef_construction, tuple(args.efs), b1_hnsw=min(len(xq), 1000),
                        b1_flat=min(len(xq), 1000))
    res["model"] = emb["manifest"].get("model")
    return res


def estimate_seconds(rate_at_probe: float, probe_n: int, n: int) -> float:
    """HNSW insert cost grows ~log(N): integrate 1/rate(N) with rate ∝ 1/log(N)."""
    if n <= probe_n:
        return n / rate_at_probe
    # average log over [0, n] vs over [0, probe_n]: mean(log x) = log n - 1
    return n / rate_at_probe * (math.log(n) - 1) / (math.log(probe_n) - 1)


def synthetic_run(args, dump=lambda partial: None) -> dict[str, Any]:
    t0 = time.perf_counter()
    xb, xq, info = synthetic(args.n, args.queries, args.dim, args.clusters, args.spread, args.alpha, args.seed)
    gen_s = time.perf_counter() - t0
    log(f"synthetic: generated {args.n}x{args.dim} in {gen_s:.1f}s")
    probe_n = min(args.probe, args.n)
    plan: dict[str, Any] = {"probe_n": probe_n, "budget_minutes": args.budget_min}

    checkpoints = sorted({c for c in args.checkpoints if c < args.n} | {args.n})
    idx = faiss.IndexHNSWFlat(args.dim, args.m, faiss.METRIC_INNER_PRODUCT)
    idx.hnsw.efConstruction = args.ef_construction
    rss0 = rss_bytes()
    built, build_s, points = 0, 0.0, []
    stopped_early = False
    for cp in checkpoints:
        while built < cp:
            # the first `probe_n` adds double as the rate probe for the full-build estimate
            e = min(cp, built + (probe_n if built == 0 else args.chunk))
            t = time.perf_counter()
            idx.add(xb[built:e])
            build_s += time.perf_counter() - t
            built = e
            if "probe_add_rate_per_s" not in plan:
                rate = built / build_s
                est = estimate_seconds(rate, built, args.n)
                plan.update(probe_n=built, probe_add_rate_per_s=round(rate, 1),
                            estimated_full_build_minutes=round(est / 60, 1))
                log(f"probe: first {built} adds at efC={args.ef_construction}: {rate:.0f}/s; full build "
                    f"estimate {est / 60:.1f} min (budget {args.budget_min} min)")
            log(f"  added {built}/{args.n} ({build_s / 60:.1f} min, {built / build_s:.0f}/s)")
            if build_s > args.budget_min * 60 and built < args.n:
                stopped_early = True
                break
        hnsw_rss = rss_bytes() - rss0
        flat_row, d_ex, gt = flat_point(xb[:built], xq, args.k, args.flat_batch1, args.threads)
        point = {"n": built, "build_seconds_so_far": round(build_s, 1),
                 "add_rate_per_s": round(built / build_s, 1), "difficulty": neighbour_stats(d_ex),
                 "hnsw_rss_growth_bytes": hnsw_rss, "flat": flat_row,
                 "hnsw_sweep": hnsw_sweep(idx, xq, gt, args.k, tuple(args.efs), args.hnsw_batch1)}
        point["at_default_ef"] = summary(point["hnsw_sweep"], flat_row)
        log(f"checkpoint n={built}: recall@{args.k}(ef={DEFAULT_EF})="
            f"{point['at_default_ef'].get('recall_at_k')} speedup b1="
            f"{point['at_default_ef'].get('speedup_vs_flat_batch1')}x")
        points.append(point)
        dump({"dataset": "synthetic clustered", "data": info, "generate_seconds": round(gen_s, 1),
              "plan": plan, "checkpoints": points, "partial": True})
        if stopped_early:
            break
    final = {"n_reached": built, "complete": built == args.n, "stopped_by_budget": stopped_early,
             "M": args.m, "ef_construction": args.ef_construction, "build_seconds": round(build_s, 1),
             "index_bytes": serialized_bytes(idx), "rss_growth_bytes": points[-1]["hnsw_rss_growth_bytes"]}
    return {"dataset": "synthetic clustered", "data": info, "generate_seconds": round(gen_s, 1),
            "plan": plan, "hnsw_build": final, "checkpoints": points}


def table(result: dict[str, Any]) -> str:
    lines = [f"{'dataset':<34} {'N':>9} {'index':<14} {'efS':>4} {'R@10':>6} {'ms/q b1':>9} {'ms/q bat':>9}"]

    def rows(name, n, flat, sweep, tag):
        if flat:
            lines.append(f"{name:<34} {n:>9} {'flat':<14} {'-':>4} {1.0:>6.3f} "
                         f"{flat['ms_per_query_batch1']:>9.3f} {flat['ms_per_query_batched']:>9.3f}")
        for r in sweep:
            lines.append(f"{name:<34} {n:>9} {tag:<14} {r['ef_search']:>4} {r['recall_at_k']:>6.3f} "
                         f"{r['ms_per_query_batch1']:>9.3f} {r['ms_per_query_batched']:>9.3f}")

    for ds in result.get("flickr", []):
        h = ds["hnsw"]
        rows(ds["dataset"][:34], ds["n"], ds["flat"], h["sweep"], f"hnsw{h['M']},efC{h['ef_construction']}")
    syn = result.get("synthetic")
    if syn:
        b = syn["hnsw_build"]
        for p in syn["checkpoints"]:
            rows("synthetic", p["n"], p["flat"], p["hnsw_sweep"], f"hnsw{b['M']},efC{b['ef_construction']}")
    return "\n".join(lines)


def plot(result: dict[str, Any] | list[dict[str, Any]], path: Path) -> None:
    """recall@10 vs batch-1 ms/query for every dataset in one or several result files."""
    results = result if isinstance(result, list) else [result]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = []
    for result in results:
        for ds in result.get("flickr", []):
            series.append((f"Flickr8k test {ds['n']} (efC={ds['hnsw']['ef_construction']})",
                           ds["hnsw"]["sweep"], ds["flat"]))
        syn = result.get("synthetic")
        if syn:
            efc = syn.get("hnsw_build", {}).get("ef_construction") or _argv_value(result["argv"], "--ef-construction", 200)
            alpha = syn["data"]["noise_spectrum"].split("^-")[1].split(",")[0]
            for p in syn["checkpoints"]:
                series.append((f"synthetic {p['n']:,} (efC={efc}, alpha={alpha})", p["hnsw_sweep"], p["flat"]))
    for label, sweep, flat in series:
        xs = [r["ms_per_query_batch1"] for r in sweep]
        ys = [r["recall_at_k"] for r in sweep]
        (line,) = ax.plot(xs, ys, marker="o", label=label)
        for r in sweep:
            if r["ef_search"] == DEFAULT_EF:
                ax.annotate(f"ef{r['ef_search']}", (r["ms_per_query_batch1"], r["recall_at_k"]),
                            fontsize=7, textcoords="offset points", xytext=(3, -9))
        if flat:
            ax.axvline(flat["ms_per_query_batch1"], color=line.get_color(), ls=":", lw=1)
    ax.axhline(0.95, color="grey", lw=0.6, ls="--")
    ax.axhline(0.99, color="grey", lw=0.6, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("ms / query (batch 1, log scale); dotted: exact flat search")
    ax.set_ylabel("recall@10 vs exact")
    ax.set_title("HNSW (M=16) efSearch sweep")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _argv_value(argv: list[str], flag: str, default: Any) -> Any:
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else default


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, help="artifacts folder with embeddings/<split>/")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=1_000_000, help="synthetic vectors (0: skip synthetic)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--spread", type=float, default=1.0)
    ap.add_argument("--alpha", type=float, default=1.0, help="noise spectrum decay (see synthetic)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--efs", type=int, nargs="+", default=list(SWEEP_EF))
    ap.add_argument("--probe", type=int, default=50_000)
    ap.add_argument("--chunk", type=int, default=50_000)
    ap.add_argument("--checkpoints", type=int, nargs="*", default=[100_000, 250_000, 500_000])
    ap.add_argument("--budget-min", type=float, default=25.0, help="stop adding after this build time")
    ap.add_argument("--hnsw-batch1", type=int, default=300, help="queries timed one per call (HNSW)")
    ap.add_argument("--flat-batch1", type=int, default=20, help="queries timed one per call (flat)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--plot-only", type=Path, nargs="+", metavar="JSON",
                    help="only draw --plot from earlier result files (no benchmark)")
    args = ap.parse_args(argv)
    if args.plot_only:
        results = [json.loads(p.read_text()) for p in args.plot_only]
        plot(results, args.plot or Path("docs/bench_index_sweep.png"))
        return {"plotted": [str(p) for p in args.plot_only]}

    # faiss's OpenMP pool: one thread per core we were given, set once before any index work
    faiss.omp_set_num_threads(args.threads)
    result: dict[str, Any] = {"benchmark": "index", "env": machine_env(args.threads, faiss=faiss.__version__),
                              "argv": sys.argv[1:] if argv is None else argv, "k": args.k}
    t0 = time.perf_counter()
    if args.artifacts:
        result["flickr"] = [flickr(args.artifacts, args.split, args)]
        log(table({"flickr": result["flickr"]}))
    def dump(partial: dict[str, Any]) -> None:
        write_json(args.out, {**result, "synthetic": partial})  # a long run leaves what it has so far

    if args.n > 0:
        result["synthetic"] = synthetic_run(args, dump)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    finish(result, table(result), args.out)
    if args.plot:
        plot(result, args.plot)
    return result


if __name__ == "__main__":
    main()
