"""Live writes: upload throughput, search latency beside a write stream, start-up replay, compaction.

    python benchmarks/bench_writes.py service --artifacts DIR --images DIR [--uploads 60] [--out FILE]
    python benchmarks/bench_writes.py store [--startup-n 30000] [--compact-n 100000] [--out FILE]

`service` copies nothing itself: point it at a *writable copy* of an artifacts dir (the model, its
checkpoint and a collection) and a folder of images to upload. It starts `uvicorn app.main:app` with
writes on and measures, over loopback:
  - uploads/s at 1 and 2 clients, and the share of each upload's server time spent encoding
    (the upload's `Server-Timing`: decode, encode, commit);
  - uncached /search/text p50/p99 at 4 clients without and with 2 clients uploading all along.
`store` measures the FAISS + SQLite store on synthetic 256-d vectors (no model):
  - start-up (open + load) of an HNSW collection with 0 / 1,000 / 10,000 changes committed after its
    snapshot, against the same collection without a snapshot (graph rebuilt at start-up);
  - compaction of a 100,000-item collection with 1% tombstones and 1% delta.
Prints JSON on stdout and a table on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import finish, log, machine_env  # noqa: E402
from benchmarks.bench_service import WORDS, stage_ms, start_server, stop  # noqa: E402

TOKEN = "bench-write-token-0123456789"


# -- service ---------------------------------------------------------------------------------------

async def _uploads(base: str, files: list[Path], clients: int) -> dict:
    lat, enc, total_srv = [], [], []
    stages: dict[str, list[float]] = {"decode": [], "encode": [], "commit": []}
    errors: dict[int, int] = {}
    it = iter(files)
    async with httpx.AsyncClient(base_url=base, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        async def worker() -> None:
            for path in it:
                t = time.perf_counter()
                r = await c.post("/collections/flickr8k/media", files={"file": (path.name, path.read_bytes(), "image/jpeg")},
                                 data={"image_id": f"bench/{clients}/{path.name}"})
                if r.status_code not in (200, 201):
                    errors[r.status_code] = errors.get(r.status_code, 0) + 1
                    continue
                lat.append(time.perf_counter() - t)
                timing = r.headers.get("server-timing", "")
                for s in stages:
                    v = stage_ms(timing, s)
                    if v is not None:
                        stages[s].append(v)
                total_srv.append(stage_ms(timing, "total") or 0.0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    med = {s: round(float(np.median(v)), 2) for s, v in stages.items() if v}
    return {"clients": clients, "n_ok": len(lat), "errors": errors, "uploads_per_s": round(len(lat) / wall, 2),
            "p50_ms": round(float(np.median(lat)) * 1000, 1), "server_stage_p50_ms": med,
            "encode_share_of_server_time": round(float(np.sum(stages["encode"]) / np.sum(total_srv)), 3)
            if total_srv else None}


async def _searches(base: str, n: int, clients: int, write_files: list[Path] | None, seed: int) -> dict:
    rng = random.Random(seed)
    queries = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) + f" {seed}-{i}" for i in range(n)]
    lat: list[float] = []
    errors: dict[int, int] = {}
    writes = {"ok": 0, "429": 0, "other": 0}
    done = asyncio.Event()
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as c:
        it = iter(queries)

        async def searcher() -> None:
            for q in it:
                t = time.perf_counter()
                r = await c.post("/search/text", json={"query": q, "k": 10})
                if r.status_code == 200:
                    lat.append(time.perf_counter() - t)
                else:
                    errors[r.status_code] = errors.get(r.status_code, 0) + 1

        async def writer(w: int) -> None:
            assert write_files is not None
            i = 0
            while not done.is_set():
                path = write_files[i % len(write_files)]
                r = await c.post("/collections/flickr8k/media", headers={"Authorization": f"Bearer {TOKEN}"},
                                 files={"file": (path.name, path.read_bytes(), "image/jpeg")},
                                 data={"image_id": f"stream/{seed}/{w}/{i}"})
                writes["ok" if r.status_code in (200, 201) else "429" if r.status_code == 429 else "other"] += 1
                i += 1

        writers = [asyncio.create_task(writer(w)) for w in range(2)] if write_files else []
        await asyncio.gather(*(searcher() for _ in range(clients)))
        done.set()
        await asyncio.gather(*writers)
    a = np.array(lat) * 1000
    return {"clients": clients, "n_ok": len(lat), "errors": errors, "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), **({"writes": writes} if write_files else {})}


def run_service(args: argparse.Namespace) -> dict:
    files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    rng = random.Random(0)
    rng.shuffle(files)
    env = {"CLIPSEARCH_WRITE_TOKEN": TOKEN, "CLIPSEARCH_COLLECTIONS": "flickr8k", "CLIPSEARCH_CACHE_SIZE": "0",
           "CLIPSEARCH_INFERENCE_THREADS": "2", "CLIPSEARCH_ONNX_CACHE_DIR": str(Path(args.artifacts) / "onnx")}
    proc, base = start_server(Path(args.artifacts), env)
    try:
        log("warm-up")
        asyncio.run(_searches(base, 20, 1, None, 99))
        asyncio.run(_uploads(base, files[-10:], 1))
        out = {"uploads": [], "search": []}
        at = 0
        for clients in (1, 2):
            log(f"uploads at {clients} client(s)")
            out["uploads"].append(asyncio.run(_uploads(base, files[at:at + args.uploads], clients)))
            at += args.uploads
        log("search without writes")
        out["search"].append({"writes": False, **asyncio.run(_searches(base, args.searches, 4, None, 1))})
        log("search with 2 clients uploading")
        out["search"].append({"writes": True, **asyncio.run(_searches(base, args.searches, 4, files[at:at + 400], 2))})
        # and again without, so a drift in the machine's load shows
        out["search"].append({"writes": False, **asyncio.run(_searches(base, args.searches, 4, None, 3))})
        return out
    finally:
        stop(proc)


# -- store ----------------------------------------------------------------------------------------

def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _collection(root: Path, n: int, d: int, seed: int):
    from clipsearch.artifacts import ArtifactLayout
    from clipsearch.store import Catalog, NewItem

    layout = ArtifactLayout(root).collection("bench")
    rng = np.random.default_rng(seed)
    with Catalog(layout.catalog) as cat:
        cat.set_model({"model": "synthetic", "embed_dim": d}, d)
        for start in range(0, n, 5000):
            vecs = _unit(rng, min(5000, n - start), d)
            cat.put(NewItem(f"i{start + i}", "/x", v, metadata={"g": (start + i) % 10}) for i, v in enumerate(vecs))
    return layout


def _open_seconds(layout, exact_max: int) -> tuple[float, dict]:
    from clipsearch.store import FaissStore

    t0 = time.perf_counter()
    store = FaissStore.open(layout, readonly=False, exact_max=exact_max)
    store.describe()
    took = time.perf_counter() - t0
    stats = store.stats()
    store.close()
    return took, stats


def run_store(args: argparse.Namespace) -> dict:
    from clipsearch.store import FaissStore, NewItem

    from clipsearch.store import EXACT_MAX

    d = args.dim
    em = args.exact_max if args.exact_max is not None else EXACT_MAX
    tmp = Path(tempfile.mkdtemp(prefix="bench-writes-", dir=args.tmp))
    out: dict = {"startup": [], "compaction": None}
    try:
        log(f"start-up: a {args.startup_n:,}-item HNSW collection")
        layout = _collection(tmp / "a", args.startup_n, d, 0)
        t0 = time.perf_counter()
        store = FaissStore.open(layout, readonly=False, exact_max=em)
        store.describe()  # no snapshot: the graph is built at start-up
        t_build = time.perf_counter() - t0
        out["startup"].append({"changes_after_snapshot": None, "snapshot": False, "seconds": round(t_build, 2)})
        store.save_snapshot()
        store.close()
        rng = np.random.default_rng(1)
        done = 0
        for changes in (0, 1000, 10000):
            if changes > done:
                cat_store = FaissStore.open(layout, readonly=False, exact_max=em)
                add = changes - done
                vecs = _unit(rng, add, d)
                # half new items, a quarter deletions, a quarter replacements, in commits of 100
                for s in range(0, add, 100):
                    chunk = range(s, min(s + 100, add))
                    news = [NewItem(f"n{done + i}", "/x", vecs[i]) for i in chunk if i % 4 < 2]
                    repl = [NewItem(f"i{done + i}", "/x", vecs[i]) for i in chunk if i % 4 == 2]
                    dels = [f"i{args.startup_n - 1 - done - i}" for i in chunk if i % 4 == 3]
                    cat_store.catalog.put(news + repl)
                    cat_store.catalog.delete(dels)
                cat_store.close()
                done = changes
            seconds, stats = _open_seconds(layout, em)
            out["startup"].append({"changes_after_snapshot": changes, "snapshot": True, "seconds": round(seconds, 2),
                                   "replayed": stats["replayed_at_start"],
                                   "vs_rebuild": round(seconds / t_build, 3)})
            log(f"  {changes} changes: {seconds:.2f} s")
        log(f"compaction: a {args.compact_n:,}-item collection, 1% tombstones, 1% delta")
        layout = _collection(tmp / "b", args.compact_n, d, 2)
        store = FaissStore.open(layout, readonly=False, exact_max=em)
        t0 = time.perf_counter()
        store.describe()
        load = time.perf_counter() - t0
        rng = np.random.default_rng(3)
        k = args.compact_n // 100
        store.add([NewItem(f"d{i}", "/x", v) for i, v in enumerate(_unit(rng, k, d))])
        store.delete([f"i{i}" for i in range(0, k * 7, 7)])
        before = store.stats()
        q = _unit(rng, 200, d)

        def search_ms() -> float:
            t = time.perf_counter()
            for v in q:
                store.search(v, 10)
            return (time.perf_counter() - t) / len(q) * 1000

        ms_before = search_ms()
        res = store.compact()
        ms_after = search_ms()
        out["compaction"] = {"items": args.compact_n, "tombstones": before["images"]["tombstones"],
                             "delta": before["images"]["delta"], "seconds": res["seconds"],
                             "initial_build_seconds": round(load, 2),
                             "search_ms_before": round(ms_before, 3), "search_ms_after": round(ms_after, 3)}
        store.close()
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    s = sub.add_parser("service")
    s.add_argument("--artifacts", required=True)
    s.add_argument("--images", required=True)
    s.add_argument("--uploads", type=int, default=60)
    s.add_argument("--searches", type=int, default=300)
    st = sub.add_parser("store")
    st.add_argument("--startup-n", type=int, default=30_000)
    st.add_argument("--compact-n", type=int, default=100_000)
    st.add_argument("--dim", type=int, default=256)
    st.add_argument("--exact-max", type=int, default=None, help="default: the store's EXACT_MAX (20,000)")
    st.add_argument("--tmp", default=None)
    for sp in (s, st):
        sp.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    import faiss

    result = {"env": machine_env(threads=int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or os.cpu_count() or 1,
                                 faiss=faiss.__version__)}
    if args.part == "service":
        result["service"] = run_service(args)
        rows = ["| clients | uploads/s | p50 ms | server decode / encode / commit p50 ms | encode share |",
                "|---|---|---|---|---|"]
        for u in result["service"]["uploads"]:
            st_ = u["server_stage_p50_ms"]
            rows.append(f"| {u['clients']} | {u['uploads_per_s']} | {u['p50_ms']} | {st_.get('decode')} / "
                        f"{st_.get('encode')} / {st_.get('commit')} | {u['encode_share_of_server_time']} |")
        rows += ["", "| search (4 clients) | p50 ms | p99 ms | errors | writes |", "|---|---|---|---|---|"]
        for x in result["service"]["search"]:
            rows.append(f"| {'with' if x['writes'] else 'without'} writes | {x['p50_ms']} | {x['p99_ms']} | "
                        f"{x['errors']} | {x.get('writes', '')} |")
    else:
        result["store"] = run_store(args)
        rows = ["| start-up | seconds | replayed | vs rebuild |", "|---|---|---|---|"]
        for x in result["store"]["startup"]:
            name = "no snapshot (graph rebuilt)" if not x["snapshot"] else f"snapshot + {x['changes_after_snapshot']} changes"
            rows.append(f"| {name} | {x['seconds']} | {x.get('replayed', '')} | {x.get('vs_rebuild', '')} |")
        c = result["store"]["compaction"]
        rows += ["", f"compaction of {c['items']:,} items ({c['tombstones']} tombstones, {c['delta']} delta): "
                 f"{c['seconds']} s (first build at open: {c['initial_build_seconds']} s); search "
                 f"{c['search_ms_before']} -> {c['search_ms_after']} ms/query"]
    finish(result, "\n".join(rows), args.out)


if __name__ == "__main__":
    main()
