"""Service start-up: process spawn to the first `/readyz` 200, and RSS, for collections of N items,
against the raw `faiss.read_index` of the same snapshot files plus the model load.

    python benchmarks/bench_startup.py --work DIR [--sizes 10000 100000 1000000] [--reps 3]
        [--large-ef-construction 40] [--code CHECKOUT] [--out FILE]

For each N it first generates (once; reused while the spec matches) a collection in the product's own
on-disk layout under `DIR/n<N>/collections/synth/`: `catalog.sqlite` (the catalog's schema, bulk
inserted in one transaction) and the HNSW snapshot in `index/` (built with the store's parameters,
saved with `VectorIndex.save` and the same manifest fields, ids file and tags as
`FaissStore._save_indexes`), so the service loads the snapshot instead of rebuilding: the build
checks that the store accepts it (`FaissStore._load_snapshot`). Vectors: 256-d unit vectors from a
clustered mixture (`bench_index.synthetic`); one caption per item up to `--captions-max` items (none
above), whose vector is its image's plus noise; two metadata fields with few values (facets).

Then, interleaved per repetition (page cache warm: every file was just written or read):
  (a) `faiss.read_index` of the snapshot files the service loads, in a fresh process: seconds of the
      calls alone and the RSS they add;
  (b) the model load alone, in a fresh process: what `load_resources` does for the model (load_model,
      the ONNX text/image backends from a warm ONNX cache), timed from spawn (interpreter and imports
      included, as the service pays them) and in-process;
  (c) `python -m uvicorn app.main:app` with ARTIFACTS_DIR pointing at the collection: spawn to the
      first `/readyz` 200 (polled every 10 ms), VmRSS and VmHWM at ready, and one `/search/text`.
ratio = (c) / ((a) + (b)), against the target 1.5. The model is the one the collection names: by
default the offline model's record (`--model-record`, lit-effnet-minilm's checkpoint) — its weights
only change the model-load term, not the store's.

`CLIPSEARCH_EXACT_MAX` is set to `--exact-max` (default 5000) so every N, 10k included, serves its
targets from HNSW snapshots and (a) reads the same files the service reads.

The graphs use the service's defaults (M 16, efConstruction 200), except collections of `--large`
items or more (1M) with `--large-ef-construction`: at efConstruction 200 HNSW adds ~950 vectors/s on
this 2-core machine under load (the 100k build), so 1M would take over 17 minutes. The service is
then started with CLIPSEARCH_HNSW_EF_CONSTRUCTION set to match (it refuses a snapshot of other
params). M, N and the dimension fix the file's size and layout, so read and load times do not depend
on efConstruction; only the graph's recall does, which this benchmark does not measure.
`--code` runs another checkout's service and load path on the same data (a before/after pair).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# the code under test (`--code`): the probes and the service import it; default this checkout
CODE = Path(os.environ.get("BENCH_STARTUP_CODE") or ROOT)
sys.path.insert(0, str(CODE))

from benchmarks._common import finish, log, machine_env  # noqa: E402

DIM = 256
COLLECTION = "synth"
SPEC_VERSION = 1


# -- generation ------------------------------------------------------------------------------------
def rss_kib(pid: int | str = "self") -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(val.split()[0])
    return out


def build_collection(art: Path, n: int, captions: bool, model: dict[str, Any], exact_max: int,
                     threads: int, ef_construction: int, seed: int = 0) -> dict[str, Any]:
    """The collection `synth` of `n` items under `art` (see the module docstring); returns build times."""
    import faiss

    from benchmarks.bench_index import synthetic
    from clipsearch.artifacts import ArtifactLayout
    from clipsearch.index import IndexParams, VectorIndex
    from clipsearch.manifest import atomic_write_text, sha256_json, write_json_atomic
    from clipsearch.store.catalog import Catalog, captions_sha256
    from clipsearch.store.faiss_store import SNAPSHOT_NAMES, FaissStore, _hnsw_params

    spec = {"version": SPEC_VERSION, "n": n, "dim": DIM, "captions": captions, "model": model, "seed": seed}
    if ef_construction != 200:
        spec["ef_construction"] = ef_construction
    layout = ArtifactLayout(art)
    coll = layout.collection(COLLECTION)
    marker = art / "built.json"
    if marker.is_file() and json.loads(marker.read_text()).get("spec") == spec:
        log(f"n={n}: reusing {coll.dir}")
        return json.loads(marker.read_text())["build"]
    if coll.dir.exists():
        import shutil

        shutil.rmtree(coll.dir)
    faiss.omp_set_num_threads(threads)
    art.mkdir(parents=True, exist_ok=True)
    write_json_atomic(layout.model_record, model)
    times: dict[str, Any] = {}
    t0 = time.perf_counter()
    vecs, _, info = synthetic(n, 0, d=DIM, clusters=max(10, n // 1000), seed=seed)
    rng = np.random.default_rng(seed + 1)
    cap_vecs = None
    if captions:
        cap_vecs = vecs + rng.standard_normal(vecs.shape, dtype=np.float32) * 0.05
        cap_vecs /= np.linalg.norm(cap_vecs, axis=1, keepdims=True)
    times["generate_s"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    cat = Catalog(coll.catalog)
    cat.set_model(model, DIM)
    cameras = ("phone", "dslr", "scanner", "drone")
    ids = [f"img{i:07d}" for i in range(n)]
    cap_ids = [f"{i}#0" for i in ids] if captions else []
    with cat.transaction() as conn:
        seq = int(conn.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0]) + 1
        conn.executemany(
            "INSERT INTO items (image_id, path, size, mtime_ns, sha256, metadata, text_sha256, vector, seq) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ((ids[i], f"/data/synthetic/{ids[i]}.jpg", 50_000 + i % 9973, 1_700_000_000_000_000_000 + i,
              None, json.dumps({"camera": cameras[i % 4], "year": 1995 + i % 30}, sort_keys=True),
              captions_sha256([f"a synthetic photo number {i}"] if captions else []), vecs[i].tobytes(), seq)
             for i in range(n)))
        if captions:
            conn.executemany(
                "INSERT INTO captions (caption_id, image_id, ord, caption, vector, seq) VALUES (?, ?, ?, ?, ?, ?)",
                ((cap_ids[i], ids[i], 0, f"a synthetic photo number {i}", cap_vecs[i].tobytes(), seq)
                 for i in range(n)))
    cat_model = cat.model()
    cat.close()  # folds the WAL into the main file
    times["catalog_s"] = round(time.perf_counter() - t0, 2)

    # what the service asks for with its default settings (and CLIPSEARCH_HNSW_EF_CONSTRUCTION)
    params = _hnsw_params(IndexParams(ef_construction=ef_construction))
    targets = {"images": (vecs, ids)}
    if captions:
        targets["captions"] = (cap_vecs, cap_ids)
    for target, (x, tids) in targets.items():
        if x.shape[0] <= exact_max:
            continue
        t0 = time.perf_counter()
        # what FaissStore._build_index + _save_indexes do, without loading the rows into a store first
        index = VectorIndex.build(x, params, offsets=None, collection=COLLECTION, catalog_seq=seq, model=cat_model)
        times[f"hnsw_{target}_s"] = round(time.perf_counter() - t0, 2)
        times[f"hnsw_{target}_add_per_s"] = round(x.shape[0] / (time.perf_counter() - t0), 1)
        name = SNAPSHOT_NAMES[target]
        ids_sha = sha256_json(tids)
        ids_file = coll.index_dir / f"{name}.ids.{ids_sha[:12]}.json"
        coll.index_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(ids_file, json.dumps(tids))
        index.manifest.update({"collection": COLLECTION, "catalog_seq": seq, "model": dict(cat_model),
                               "ids_file": ids_file.name, "ids_sha256": ids_sha})
        index.save(coll.index_dir, name)
        log(f"n={n}: {target} HNSW built in {times[f'hnsw_{target}_s']} s")
        del index
    # the store must take these snapshots as they are (no rebuild at start-up)
    store = FaissStore.open(coll, readonly=True, params=params, exact_max=exact_max)
    head = store.catalog.head()
    for target, (x, _) in targets.items():
        if x.shape[0] > exact_max:
            if store._load_snapshot(target, head[0], head[2], False) is None:
                raise SystemExit(f"n={n}: the store rejects the generated {target} snapshot")
    store.close()
    build = {**times, "ef_construction": ef_construction, "data": info, "captions_per_item": 1 if captions else 0,
             "catalog_bytes": coll.catalog.stat().st_size,
             "snapshot_bytes": sum(p.stat().st_size for p in coll.index_dir.glob("*.faiss"))}
    marker.write_text(json.dumps({"spec": spec, "build": build}, indent=2))
    return build


def snapshot_files(art: Path) -> list[Path]:
    index_dir = art / "collections" / COLLECTION / "index"
    return [index_dir / json.loads(m.read_text())["index_file"] for m in sorted(index_dir.glob("*.hnsw.json"))]


# -- probes (each runs in a fresh process) ------------------------------------------------------------
def probe_read(paths: list[str]) -> dict[str, Any]:
    import faiss

    before = rss_kib()["VmRSS"]
    t0 = time.perf_counter()
    indexes = [faiss.read_index(p) for p in paths]
    took = time.perf_counter() - t0
    return {"read_index_s": took, "rss_delta_kib": rss_kib()["VmRSS"] - before,
            "ntotal": [int(i.ntotal) for i in indexes]}


def probe_model(art: str) -> dict[str, Any]:
    """What `app.resources.load_resources` does for the model, timed alone."""
    from app.config import Settings
    from app.resources import _resolve_checkpoint, configure_threads
    from clipsearch.encoder import ClipEncoder, image_backend_for, text_backend_for
    from clipsearch.models import load_model

    settings = Settings(artifacts_dir=Path(art))
    configure_threads(settings)
    model = json.loads((Path(art) / "model.json").read_text())
    t0 = time.perf_counter()
    pretrained = _resolve_checkpoint(model.get("pretrained"), model.get("checkpoint_sha256"), settings)
    loaded = load_model(model["model"], pretrained, device=settings.device,
                        checkpoint_sha256=model.get("checkpoint_sha256"))
    threads = settings.torch_threads or 1
    ClipEncoder(loaded, text_backend=text_backend_for(loaded, settings.text_backend, settings.onnx_cache_dir, threads),
                image_backend=image_backend_for(loaded, settings.image_backend, settings.onnx_cache_dir,
                                                settings.image_threads or threads))
    return {"model_load_in_process_s": time.perf_counter() - t0, "rss_kib": rss_kib()["VmRSS"]}


def run_probe(args: list[str], env: dict[str, str]) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"probe {args[0]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1]), wall


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_of(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def service_start(env: dict[str, str], timeout_s: float) -> dict[str, Any]:
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port",
                             str(port), "--log-level", "warning"], env=env, cwd=CODE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        first_http = None
        while True:
            if proc.poll() is not None:
                raise SystemExit("server exited: " + proc.stderr.read().decode()[-3000:])
            if time.perf_counter() - t0 > timeout_s:
                raise SystemExit(f"server not ready in {timeout_s} s")
            try:
                code, body = status_of(port, "GET", "/readyz")
            except OSError:
                time.sleep(0.01)
                continue
            first_http = first_http or time.perf_counter() - t0
            if code == 200:
                ready = time.perf_counter() - t0
                break
            time.sleep(0.01)
        mem = rss_kib(proc.pid)
        counts = json.loads(body).get("collections")
        code, hits = status_of(port, "POST", "/search/text", json.dumps({"query": "a dog on the beach", "k": 5}).encode())
        if code != 200 or len(json.loads(hits).get("results", json.loads(hits).get("hits", []))) == 0:
            raise SystemExit(f"/search/text answered {code}: {hits[:300]!r}")
        return {"readyz_s": ready, "first_http_s": first_http, "rss_kib": mem["VmRSS"], "hwm_kib": mem["VmHWM"],
                "rss_anon_kib": mem["RssAnon"], "rss_file_kib": mem["RssFile"], "counts": counts}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the run -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="where the generated collections live (large)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--captions-max", type=int, default=100_000,
                    help="collections up to this many items get one caption per item; larger ones none")
    ap.add_argument("--exact-max", type=int, default=5000)
    ap.add_argument("--model-record", type=Path, default=Path("artifacts/model.json"),
                    help="model.json of the model the collections name (its checkpoint must be readable; "
                         "default: %(default)s, what `clipsearch serve --data ../shared/flickr8k` builds)")
    ap.add_argument("--build-threads", type=int, default=2)
    ap.add_argument("--large", type=int, default=1_000_000,
                    help="collections of at least this many items are built with --large-ef-construction")
    ap.add_argument("--large-ef-construction", type=int, default=200,
                    help="efConstruction of the large collections' graphs (the service is started with "
                         "CLIPSEARCH_HNSW_EF_CONSTRUCTION set to it, so it loads them); the file's size and "
                         "layout, hence its read time, depend on M and N, not on efConstruction")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--timeout", type=float, default=900, help="seconds one service start may take")
    ap.add_argument("--code", type=Path, default=ROOT,
                    help="checkout whose app/ and clipsearch/ the probes and the service run (e.g. a "
                         "worktree of the previous commit, for a before/after pair on the same data)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    import faiss

    model = json.loads(args.model_record.read_text())
    env_rec = machine_env(threads=args.build_threads, faiss=faiss.__version__)
    result: dict[str, Any] = {"benchmark": "startup", "env": env_rec, "argv": sys.argv[1:], "code": str(args.code),
                              "model": model, "exact_max": args.exact_max, "target_ratio": 1.5, "sizes": []}
    onnx_cache = args.work / "onnx-cache"
    global CODE
    CODE = args.code.resolve()
    base_env = {**os.environ, "PYTHONPATH": str(CODE), "BENCH_STARTUP_CODE": str(CODE),
                "CLIPSEARCH_ONNX_CACHE_DIR": str(onnx_cache),
                "CLIPSEARCH_EXACT_MAX": str(args.exact_max)}
    builds = {}

    def efc(n: int) -> int:
        return args.large_ef_construction if n >= args.large else 200
    for n in args.sizes:
        art = args.work / f"n{n}"
        builds[n] = build_collection(art, n, n <= args.captions_max, model, args.exact_max, args.build_threads,
                                     efc(n))
        log(f"n={n}: build {json.dumps({k: v for k, v in builds[n].items() if k != 'data'})}")
    if args.build_only:
        return result
    # warm the ONNX export cache once (the first start of a model exports its towers; later starts read them)
    warm, warm_wall = run_probe(["--_probe-model", str(args.work / f"n{args.sizes[0]}")], base_env)
    log(f"model warm-up (ONNX cache {onnx_cache}): {warm_wall:.1f} s")
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in args.sizes}
    for rep in range(args.reps):
        for n in args.sizes:
            art = args.work / f"n{n}"
            env = {**base_env, "ARTIFACTS_DIR": str(art), "CLIPSEARCH_HNSW_EF_CONSTRUCTION": str(efc(n))}
            files = [str(p) for p in snapshot_files(art)]
            read, read_wall = run_probe(["--_probe-read", *files], env)
            mdl, mdl_wall = run_probe(["--_probe-model", str(art)], env)
            svc = service_start(env, args.timeout)
            rec = {"read_index_s": read["read_index_s"], "read_index_rss_delta_kib": read["rss_delta_kib"],
                   "read_index_process_s": read_wall, "model_process_s": mdl_wall,
                   "model_in_process_s": mdl["model_load_in_process_s"], "model_rss_kib": mdl["rss_kib"], **svc}
            rec["ratio"] = svc["readyz_s"] / (read["read_index_s"] + mdl_wall)
            runs[n].append(rec)
            log(f"rep {rep} n={n}: read_index {read['read_index_s']:.2f} s, model {mdl_wall:.2f} s, "
                f"/readyz {svc['readyz_s']:.2f} s, ratio {rec['ratio']:.2f}, RSS {svc['rss_kib'] / 1024:.0f} MiB")
    rows = []
    for n in args.sizes:
        med = {k: statistics.median(r[k] for r in runs[n]) for k in runs[n][0] if k != "counts"}
        entry = {"n": n, "snapshot_files": [p.name for p in snapshot_files(args.work / f"n{n}")],
                 "build": builds[n], "median": med, "runs": runs[n], "counts": runs[n][-1]["counts"],
                 "meets_target": med["ratio"] <= 1.5}
        result["sizes"].append(entry)
        rows.append(f"| {n:>9,} | {med['read_index_s']:8.2f} | {med['read_index_rss_delta_kib'] / 1024:8.0f} | "
                    f"{med['model_process_s']:7.2f} | {med['readyz_s']:8.2f} | {med['ratio']:5.2f} | "
                    f"{med['rss_kib'] / 1024:8.0f} | {med['hwm_kib'] / 1024:8.0f} |")
    table = ("| N | read_index s | read_index RSS MiB | model s | /readyz s | ratio | RSS ready MiB | HWM MiB |\n"
             "|---:|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows))
    return finish(result, table, args.out)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_probe-read":
        print(json.dumps(probe_read(sys.argv[2:])))
    elif len(sys.argv) > 1 and sys.argv[1] == "--_probe-model":
        print(json.dumps(probe_model(sys.argv[2])))
    else:
        main()
