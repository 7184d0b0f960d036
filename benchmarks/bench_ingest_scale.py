"""Ingest at scale (issue 16, target 4): does `python -m offline ingest` of a large photo folder keep up
with the pure forward pass of its image tower, with flat memory, and does it resume after a kill?

Two subcommands:

  generate  writes N JPEGs under FOLDER from the Flickr8k images: each a random crop (50-100 % of the
            area, aspect 3:4 to 4:3) of one source image, stretched by up to 4:3 either way, resized
            to a long side of 160/320/480/640 px and saved at JPEG quality 85-95; deterministic
            (`--seed`), in subfolders of at most 1,000 files. It streams (a bounded few images in
            flight, never a list of N) and resumes (files that exist are skipped; each is written to
            a hidden temporary name first and renamed, so a killed run leaves no half file).
  run       in one run: (1) the pure forward pass of the same image tower ingest uses (the model
            ingest would load, `ClipEncoder.encode_pixels` on pre-decoded, pre-processed tensors of
            the folder's first images, `--batch` 64, the same backend and thread count), (2) `python -m
            offline ingest FOLDER --out ART --collection NAME ...` as a subprocess, sampling its RSS
            (/proc/PID/status VmRSS), CPU time and progress (`SELECT COUNT(*) FROM items` on the
            catalog, opened read-only) every `--sample` seconds, (3) the pure forward pass again, so
            the ceiling brackets the ingest in time. With `--kill-after S` the first ingest is
            SIGKILLed after S s of embedding, the rows kept are counted, and ingest is started again:
            it must embed only the rest (its 'N embedded'), and the catalog must end with one row per
            image and no duplicate.

Reported: sustained images/s of the embedding phase (catalog rows over time after the first
`--warmup` fraction of the images), its ratio to the pure forward (target >= 0.9), the rate in
windows over time, RSS in the first vs the last quarter of the embedding phase, and the resume check.

    python benchmarks/bench_ingest_scale.py generate --folder /tmp/scale --n 20000
    python benchmarks/bench_ingest_scale.py run --folder /tmp/scale --art ART --kill-after 60 \\
        --out benchmarks/results/ingest_scale_lit.json
    python benchmarks/bench_ingest_scale.py run --folder /tmp/scale_vit --art ART_VIT \\
        --ingest-args "--model ViT-B-32 --pretrained none" --out benchmarks/results/ingest_scale_vitb32.json
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import FLICKR8K_HELP, catalog_rows, finish, flickr8k_dir, flickr8k_images, loadavg, log, machine_env, write_json  # noqa: E402

SIDES = (160, 320, 480, 640)
PER_FOLDER = 1000


# ── generate ────────────────────────────────────────────────────────────────────────────────────────

def target_path(folder: Path, k: int) -> Path:
    return folder / f"d{k // PER_FOLDER:04d}" / f"img{k:07d}.jpg"


def make_one(src: Path, dst: Path, seed: int, k: int) -> int:
    """Write variant `k` of `src` to `dst` (atomically); returns its size in bytes."""
    from PIL import Image

    rng = random.Random(f"{seed}:{k}")
    with Image.open(src) as im:
        im = im.convert("RGB")
        w, h = im.size
        area = rng.uniform(0.5, 1.0) * w * h
        aspect = rng.uniform(3 / 4, 4 / 3)
        cw = max(16, min(w, round((area * aspect) ** 0.5)))
        ch = max(16, min(h, round((area / aspect) ** 0.5)))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = im.crop((x, y, x + cw, y + ch))
    stretch = rng.uniform(3 / 4, 4 / 3)
    fw, fh = cw * stretch, ch / stretch
    side = SIDES[k % len(SIDES)]
    scale = side / max(fw, fh)
    size = (max(1, round(fw * scale)), max(1, round(fh * scale)))
    out = crop.resize(size, Image.BICUBIC)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp"
    out.save(tmp, "JPEG", quality=rng.randint(85, 95))
    os.replace(tmp, dst)
    return dst.stat().st_size


def generate(args) -> dict[str, Any]:
    args.source = args.source or flickr8k_images(args.data)
    sources = sorted(p.name for p in args.source.glob("*.jpg"))  # the 8,091 source names, not the N outputs
    if not sources:
        raise SystemExit(f"no .jpg under {args.source}")
    random.Random(args.seed).shuffle(sources)
    t0 = time.perf_counter()
    made = skipped = nbytes = 0
    inflight: deque[Future] = deque()
    with ThreadPoolExecutor(args.threads) as pool:  # PIL decodes, resizes and encodes with the GIL released
        for k in range(args.n):
            dst = target_path(args.folder, k)
            if dst.is_file():
                skipped += 1
                continue
            inflight.append(pool.submit(make_one, args.source / sources[k % len(sources)], dst, args.seed, k))
            while len(inflight) > 4 * args.threads:
                nbytes += inflight.popleft().result()
                made += 1
                if made % 2000 == 0:
                    log(f"generate: {made} written, {skipped} skipped, {made / (time.perf_counter() - t0):.0f}/s")
        while inflight:
            nbytes += inflight.popleft().result()
            made += 1
    secs = time.perf_counter() - t0
    res = {"folder": str(args.folder), "n": args.n, "written": made, "skipped_existing": skipped,
           "bytes_written": nbytes, "seconds": round(secs, 1), "seed": args.seed, "sides": SIDES}
    log(f"generate: {res}")
    return res


# ── run ─────────────────────────────────────────────────────────────────────────────────────────────

def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def ingest_cmd(args) -> list[str]:
    return [sys.executable, "-m", "offline", "ingest", str(args.folder), "--out", str(args.art),
            "--collection", args.collection, "--batch-size", str(args.batch), *shlex.split(args.ingest_args)]


def run_ingest(args, catalog: Path, kill_after: float | None, log_path: Path) -> dict[str, Any]:
    """One ingest subprocess, sampled every `args.sample` s; SIGKILLed `kill_after` s after its first
    catalog row when given."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TQDM_DISABLE", None)
    samples: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with open(log_path, "w") as err:
        proc = subprocess.Popen(ingest_cmd(args), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        first_row_t = None
        killed = False
        while proc.poll() is None:
            t = time.perf_counter() - t0
            rows = catalog_rows(catalog)
            samples.append({"t": round(t, 2), "rows": rows, "rss_mb": rss_mb(proc.pid), "cpu_s": cpu_s(proc.pid),
                            "load1": loadavg()[0]})
            if rows and first_row_t is None:
                first_row_t = t
            if kill_after is not None and first_row_t is not None and t - first_row_t >= kill_after:
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(args.sample)
        stdout = proc.communicate()[0]
    wall = time.perf_counter() - t0
    m = re.search(r"ingest \S+: (\d+) images, (\d+) captions \((\d+) embedded", stdout or "")
    return {"rc": proc.returncode, "killed": killed, "wall_s": round(wall, 1), "stdout": (stdout or "").strip(),
            "reported_images": int(m.group(1)) if m else None, "reported_embedded": int(m.group(3)) if m else None,
            "rows_after": catalog_rows(catalog), "samples": samples, "log": str(log_path)}


def embedding_phase(samples: list[dict[str, Any]], start_rows: int, total: int, warmup: float) -> dict[str, Any]:
    """Sustained rate (rows/s between the first sample past the warm-up fraction and the last row
    written), rate in windows, and RSS of the first vs the last quarter of the embedding phase."""
    rows = [s for s in samples if s["rows"] is not None]
    todo = total - start_rows
    if not rows or todo <= 0:
        return {}
    grow = [s for s in rows if s["rows"] > start_rows]
    if not grow:
        return {}
    end_rows = max(s["rows"] for s in rows)
    last = next(s for s in rows if s["rows"] == end_rows)  # the first sample that saw the final count
    began = next((s for s in rows if s["rows"] >= start_rows + warmup * todo), grow[0])
    # the embedding phase as the catalog shows it: from the first commit of this run to its last
    t_begin = grow[0]["t"]
    phase = [s for s in samples if t_begin <= s["t"] <= last["t"] and s["rss_mb"] is not None]
    sustained = ((last["rows"] - began["rows"]) / (last["t"] - began["t"])) if last["t"] > began["t"] else None
    q = max(1, len(phase) // 4)
    first_q = sorted(s["rss_mb"] for s in phase[:q])
    last_q = sorted(s["rss_mb"] for s in phase[-q:])
    cpu = [s for s in phase if s["cpu_s"] is not None]
    # rows grow one commit (COMMIT_EVERY images) at a time: rates between the first sightings of counts
    events, seen = [], set()
    for s in phase:
        if s["rows"] is not None and s["rows"] not in seen:
            seen.add(s["rows"])
            events.append(s)
    windows = []
    step = max(1, (len(events) - 1) // 8)
    for i in range(0, len(events) - 1, step):
        a, b = events[i], events[min(len(events) - 1, i + step)]
        if b["t"] > a["t"]:
            windows.append({"t": a["t"], "rows": a["rows"], "to_rows": b["rows"],
                            "images_per_s": round((b["rows"] - a["rows"]) / (b["t"] - a["t"]), 2),
                            "rss_mb": round(a["rss_mb"], 1), "load1": a["load1"]})
    return {"rows_start": start_rows, "rows_end": end_rows, "t_begin": t_begin, "t_end": last["t"],
            "sustained_from_rows": began["rows"], "sustained_from_t": began["t"],
            "sustained_images_per_s": round(sustained, 2) if sustained else None,
            "first_to_last_commit_images_per_s": round((end_rows - grow[0]["rows"]) / (last["t"] - t_begin), 2)
            if last["t"] > t_begin else None,
            "rss_mb_first_quarter_median": round(first_q[len(first_q) // 2], 1) if first_q else None,
            "rss_mb_last_quarter_median": round(last_q[len(last_q) // 2], 1) if last_q else None,
            "rss_mb_max": round(max(s["rss_mb"] for s in phase), 1) if phase else None,
            "cpu_cores_used": round((cpu[-1]["cpu_s"] - cpu[0]["cpu_s"]) / (cpu[-1]["t"] - cpu[0]["t"]), 2)
            if len(cpu) > 1 and cpu[-1]["t"] > cpu[0]["t"] else None,
            "core_ms_per_image": round((cpu[-1]["cpu_s"] - cpu[0]["cpu_s"]) * 1000 / (cpu[-1]["rows"] - cpu[0]["rows"]), 1)
            if len(cpu) > 1 and cpu[-1]["rows"] > cpu[0]["rows"] else None,
            "load1_median": sorted(s["load1"] for s in phase)[len(phase) // 2] if phase else None,
            "windows": windows}


def pure_forward(args, n_images: int) -> tuple[Any, float]:
    """The model and image tower ingest would use, and a function timing its pure forward pass."""
    import torch

    from clipsearch.artifacts import ArtifactLayout
    from clipsearch.encoder import ClipEncoder, image_backend_for
    from clipsearch.images import decode_image
    from offline.cli import _ingest_model, _setup, build_parser

    ns = build_parser().parse_args(ingest_cmd(args)[3:])
    _setup(ns)  # the thread counts ingest sets
    loaded = _ingest_model(ns)
    threads = torch.get_num_threads()
    enc = ClipEncoder(loaded, batch_size=args.batch,
                      image_backend=image_backend_for(loaded, ns.image_backend, ArtifactLayout(ns.out).onnx_dir, threads))
    paths = []
    for k in range(n_images):
        p = target_path(args.folder, k)
        if p.is_file():
            paths.append(p)
    # CPU time, not wall (load-proof), on one torch thread: spinning OpenMP threads would count too
    torch.set_num_threads(1)
    c0 = time.process_time()
    pixels = torch.stack([loaded.preprocess(decode_image(p)) for p in paths])
    decode_core_ms = (time.process_time() - c0) * 1000 / max(1, len(paths))
    torch.set_num_threads(threads)
    with torch.inference_mode():
        enc.encode_pixels(pixels[:args.batch])  # warm-up

    def timed(min_seconds: float) -> dict[str, Any]:
        done, t0, c0 = 0, time.perf_counter(), time.process_time()
        rates = []
        with torch.inference_mode():
            while time.perf_counter() - t0 < min_seconds or done < len(pixels):
                for i in range(0, len(pixels) - args.batch + 1, args.batch):
                    t = time.perf_counter()
                    enc.encode_pixels(pixels[i:i + args.batch])
                    rates.append(args.batch / (time.perf_counter() - t))
                    done += args.batch
        secs = time.perf_counter() - t0
        cores = (time.process_time() - c0) / secs
        return {"images": done, "seconds": round(secs, 2), "images_per_s": round(done / secs, 2),
                "cpu_cores_used": round(cores, 2), "core_ms_per_image": round(cores * secs * 1000 / done, 1),
                "batch_images_per_s_median": round(sorted(rates)[len(rates) // 2], 2), "load1": loadavg()[0]}

    info = {"model": loaded.identity.to_dict(), "image_tta": loaded.identity.image_tta, "threads": threads,
            "image_backend": type(enc.image_backend).__name__ if getattr(enc, "image_backend", None) is not None
            else "torch", "pixels": list(pixels.shape),
            "decode_preprocess_core_ms_per_image": round(decode_core_ms, 2)}
    return info, timed


def run(args) -> dict[str, Any]:
    import torch

    total = sum(1 for k in range(args.n) if target_path(args.folder, k).is_file())
    n_files = sum(1 for _ in args.folder.rglob("*.jpg"))
    if n_files != total:
        raise SystemExit(f"{args.folder} holds {n_files} images, {total} of them img0..{args.n - 1}; pass --n {n_files}")
    coll = args.art / "collections" / args.collection
    catalog = coll / "catalog.sqlite"
    if catalog.exists() and not args.keep:
        raise SystemExit(f"{catalog} exists; remove {coll} or pass --keep to resume it")
    result: dict[str, Any] = {"benchmark": "ingest_scale", "argv": sys.argv[1:], "images": total,
                              "ingest_cmd": ingest_cmd(args), "env": machine_env(torch.get_num_threads(),
                                                                                 torch=torch.__version__)}
    info, timed = pure_forward(args, args.pure_images)
    result["pure_forward"] = {**info, "before": timed(args.pure_seconds)}
    log(f"pure forward before: {result['pure_forward']['before']}")
    write_json(args.out, {**result, "partial": True})
    start_rows = catalog_rows(catalog) or 0
    runs = []
    if args.kill_after is not None:
        first = run_ingest(args, catalog, args.kill_after, args.log_dir / f"{args.collection}_1.log")
        runs.append(first)
        log(f"ingest killed: rc {first['rc']}, {first['rows_after']} rows kept, wall {first['wall_s']} s")
    final = run_ingest(args, catalog, None, args.log_dir / f"{args.collection}_{len(runs) + 1}.log")
    runs.append(final)
    log(f"ingest: rc {final['rc']}, {final['stdout']}, wall {final['wall_s']} s")
    result["pure_forward"]["after"] = timed(args.pure_seconds)
    log(f"pure forward after: {result['pure_forward']['after']}")
    pure = (result["pure_forward"]["before"]["images_per_s"] + result["pure_forward"]["after"]["images_per_s"]) / 2
    result["pure_forward"]["images_per_s_mean"] = round(pure, 2)

    # the phase measured: the complete (last) run; with a kill, also the killed run's own rate
    kept = runs[0]["rows_after"] if args.kill_after is not None else start_rows
    phase = embedding_phase(final["samples"], kept or 0, total, args.warmup)
    result["ingest"] = {"runs": [{k: v for k, v in r.items() if k != "samples"} for r in runs], "phase": phase,
                        "end_to_end_images_per_s": round((total - (kept or 0)) / final["wall_s"], 2)}
    if args.kill_after is not None:
        result["ingest"]["killed_run_phase"] = embedding_phase(runs[0]["samples"], start_rows, total, args.warmup)
    result["samples"] = [r["samples"] for r in runs]
    sustained = phase.get("sustained_images_per_s")
    result["ratio_to_pure_forward"] = round(sustained / pure, 3) if sustained and pure else None
    con = sqlite3.connect(f"file:{catalog}?mode=ro", uri=True)
    n_rows, n_ids, n_paths = con.execute("SELECT COUNT(*), COUNT(DISTINCT image_id), COUNT(DISTINCT path) "
                                         "FROM items").fetchone()
    con.close()
    result["catalog"] = {"rows": n_rows, "distinct_image_ids": n_ids, "distinct_paths": n_paths}
    ok = n_rows == total == n_ids == n_paths and final["rc"] == 0
    if args.kill_after is not None:
        ok = ok and runs[0]["killed"] and final["reported_embedded"] == total - (kept or 0) and 0 < (kept or 0) < total
        result["resume"] = {"rows_kept_after_kill": kept, "embedded_by_restart": final["reported_embedded"],
                            "expected_embedded": total - (kept or 0), "final_rows": n_rows, "ok": ok}
    result["ok"] = ok
    if args.projected_n:
        result["projected_seconds_for"] = {str(args.projected_n): round(args.projected_n / sustained) if sustained else None}
    table = (f"{'model':<20} {'N':>7} {'sustained/s':>11} {'pure/s':>8} {'ratio':>6} {'RSS q1 MB':>9} "
             f"{'RSS q4 MB':>9} {'resume':>6}\n"
             f"{info['model']['model']:<20} {total:>7} {sustained or 0:>11.2f} {pure:>8.2f} "
             f"{result['ratio_to_pure_forward'] or 0:>6.3f} {phase.get('rss_mb_first_quarter_median') or 0:>9.1f} "
             f"{phase.get('rss_mb_last_quarter_median') or 0:>9.1f} "
             f"{str(result.get('resume', {}).get('ok', '-')):>6}")
    return finish(result, table, args.out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write N re-encoded Flickr8k JPEGs (resumable)")
    g.add_argument("--folder", type=Path, required=True)
    g.add_argument("--n", type=int, required=True)
    g.add_argument("--source", type=Path, default=None,
                   help="folder of photos the generated ones are made from (default: the Images/ of --data)")
    g.add_argument("--data", type=Path, default=flickr8k_dir(), help=FLICKR8K_HELP)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--out", type=Path)
    r = sub.add_parser("run", help="pure forward, then ingest sampled (optionally killed and resumed), then pure forward")
    r.add_argument("--folder", type=Path, required=True)
    r.add_argument("--n", type=int, required=True, help="images in the folder (img0 .. imgN-1)")
    r.add_argument("--art", type=Path, required=True, help="the --out of ingest (holds model.json for the default model)")
    r.add_argument("--collection", default="scale")
    r.add_argument("--ingest-args", default="", help="extra ingest arguments, e.g. \"--model ViT-B-32 --pretrained none\"")
    r.add_argument("--batch", type=int, default=64)
    r.add_argument("--kill-after", type=float, default=None, help="SIGKILL the first ingest S s after its first row")
    r.add_argument("--keep", action="store_true", help="allow an existing catalog (resume it)")
    r.add_argument("--sample", type=float, default=1.0)
    r.add_argument("--warmup", type=float, default=0.1, help="fraction of the images left out of the sustained rate")
    r.add_argument("--pure-images", type=int, default=256)
    r.add_argument("--pure-seconds", type=float, default=20.0)
    r.add_argument("--projected-n", type=int, default=100_000)
    r.add_argument("--log-dir", type=Path, default=Path("/tmp"))
    r.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "generate":
        res = generate(args)
        write_json(args.out, res)
    else:
        run(args)


if __name__ == "__main__":
    main()
