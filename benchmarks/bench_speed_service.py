"""Where users wait (issue 16), over loopback against a live `uvicorn app.main:app`:

  cached   (`--text-artifacts`) one client alternating `GET /healthz` (the floor of any answer),
           a repeated `/search/text` body (answered by the raw-body cache, `app/answer_cache.py`)
           and the same query with a different number of trailing JSON spaces each time (so it
           misses the raw cache and is a cache hit inside the handler: the path before this issue),
           interleaved request by request; p50 of each and the ratios to /healthz.
  image    (`--image-artifacts`, a collection of the model under test, e.g. ViT-B-32) one client
           uploading distinct Flickr8k images (no cache hits), p50, against naive open_clip
           `model.encode_image(pixels)` at batch 1 with `--threads` threads timed in this process
           on the same images (encode only: no decode, no HTTP). `--naive-phase separate` (the
           default) times the naive encodes in their own phase before the server starts, so neither
           side's idle threads spin against the other; `interleaved` (one upload, then one naive
           encode, in turn) is kept to show that effect: torch's spinning OpenMP threads inflate
           both sides several-fold there;
           then `--clients` concurrent image clients for each server configuration:
             before   one image per forward pass, two inference workers of one thread each (the
                      service before this issue: CLIPSEARCH_IMAGE_BATCH_SIZE=1, IMAGE_THREADS=1)
             default  micro-batched image queries on an image session with every core (defaults;
                      the image backend "auto": bf16 for a ViT tower on an AMX CPU, else ONNX)
             onnx     the default before the bf16 tower (`--onnx-config`): the same, on the ONNX
                      Runtime export (CLIPSEARCH_IMAGE_BACKEND=onnx)

    python benchmarks/bench_speed_service.py --text-artifacts A --image-artifacts B --out FILE
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import FLICKR8K_HELP, finish, flickr8k_dir, flickr8k_images, log, machine_env  # noqa: E402
from benchmarks.bench_service import drive, start_server, stop  # noqa: E402

QUERY = "a dog runs on the beach with a ball"


def pct(xs: list[float]) -> dict[str, float]:
    a = np.array(xs) * 1000
    return {f"p{q}_ms": round(float(np.percentile(a, q)), 2) for q in (50, 95, 99)} | {"n": len(xs)}


def env_for(onnx_cache: Path, **extra: str) -> dict[str, str]:
    return {"PYTHONPATH": str(ROOT), "CLIPSEARCH_ONNX_CACHE_DIR": str(onnx_cache), **extra}


def bench_cached(artifacts: Path, n: int, onnx_cache: Path) -> dict:
    proc, base = start_server(artifacts, env_for(onnx_cache, CLIPSEARCH_CACHE_SIZE="100000"))
    try:
        body = json.dumps({"query": QUERY, "k": 10}).encode()
        lat: dict[str, list[float]] = {"healthz": [], "text_cached_raw": [], "text_cached_handler": []}
        bad: dict[str, int] = {}
        with httpx.Client(base_url=base, timeout=30) as client:
            headers = {"content-type": "application/json"}
            assert client.post("/search/text", content=body, headers=headers).status_code == 200  # fill
            for i in range(n + 20):  # 20 warm-up rounds
                reqs = {"healthz": lambda: client.get("/healthz"),
                        "text_cached_raw": lambda: client.post("/search/text", content=body, headers=headers),
                        "text_cached_handler": lambda: client.post(
                            "/search/text", content=body + b" " * (1 + i), headers=headers)}
                for name, req in reqs.items():
                    t = time.perf_counter()
                    r = req()
                    dt = time.perf_counter() - t
                    if r.status_code != 200 or (name != "healthz" and r.json()["cached"] is not True):
                        bad[name] = bad.get(name, 0) + 1
                    elif i >= 20:
                        lat[name].append(dt)
        out = {name: pct(v) for name, v in lat.items()}
        h = out["healthz"]["p50_ms"]
        out["ratios"] = {"raw_cached_over_healthz_p50": round(out["text_cached_raw"]["p50_ms"] / h, 2),
                         "handler_cached_over_healthz_p50": round(out["text_cached_handler"]["p50_ms"] / h, 2)}
        out["errors"] = bad
        return out
    finally:
        stop(proc)


class Naive:
    """Naive open_clip: `model.encode_image(pixels)` at batch 1 on `threads` threads, in this process."""

    def __init__(self, model: dict, threads: int):
        import torch

        from clipsearch.models import load_model

        torch.set_num_threads(threads)
        self.torch = torch
        self.loaded = load_model(model["model"], model.get("pretrained"), "cpu")

    def time(self, data: bytes) -> float:
        from clipsearch.images import decode_image

        x = self.loaded.preprocess(decode_image(data))[None]
        with self.torch.inference_mode():
            t = time.perf_counter()
            self.loaded.model.encode_image(x)
            return time.perf_counter() - t


def interleaved_c1(base: str, naive: Naive, data: list[bytes], salt: bytes) -> tuple[dict, dict]:
    """One upload to the (otherwise idle) server, then one naive encode of the same image here, in
    turn: the two latencies of each image measured back to back."""
    served, local, bad = [], [], 0
    with httpx.Client(base_url=base, timeout=120) as client:
        for i, d in enumerate(data):
            t = time.perf_counter()
            r = client.post("/search/image", files={"file": ("q.jpg", d + salt, "image/jpeg")}, data={"k": "10"})
            dt = time.perf_counter() - t
            if r.status_code == 200 and r.json()["cached"] is False:
                served.append(dt)
            else:
                bad += 1
            local.append(naive.time(d))
    return {**pct(served), "errors": bad}, pct(local)


def naive_phase(naive: Naive, data: list[bytes]) -> dict:
    """The naive encodes alone (no server running yet), after 3 warm-up calls."""
    for d in data[:3]:
        naive.time(d)
    return pct([naive.time(d) for d in data])


def served_phase(base: str, data: list[bytes], salt: bytes) -> dict:
    served, bad = [], 0
    with httpx.Client(base_url=base, timeout=120) as client:
        for d in data:
            t = time.perf_counter()
            r = client.post("/search/image", files={"file": ("q.jpg", d + salt, "image/jpeg")}, data={"k": "10"})
            dt = time.perf_counter() - t
            if r.status_code == 200 and r.json()["cached"] is False:
                served.append(dt)
            else:
                bad += 1
    return {**pct(served), "errors": bad}


def collection_model(artifacts: Path) -> dict:
    coll = next(p for p in (artifacts / "collections").iterdir() if p.is_dir())
    return json.loads((coll / "report.json").read_text())["model"]


def bench_image(artifacts: Path, n1: int, nc: int, clients: int, threads: int, onnx_cache: Path,
                phase: str = "separate", onnx_config: bool = False,
                default_env: dict[str, str] | None = None, data: Path | None = None) -> dict:
    coll = next(p for p in (artifacts / "collections").iterdir() if p.is_dir())
    images = sorted(flickr8k_images(data or flickr8k_dir()).glob("*.jpg"))[-(n1 + nc + 10):]
    data = [p.read_bytes() for p in images]
    out: dict = {"collection": coll.name, "default_env": dict(default_env or {})}
    configs = {"default": dict(default_env or {}), "before": {"CLIPSEARCH_IMAGE_BATCH_SIZE": "1", "CLIPSEARCH_IMAGE_THREADS": "1"}}
    if onnx_config:
        configs["onnx"] = {"CLIPSEARCH_IMAGE_BACKEND": "onnx"}
    naive: Naive | None = None
    out["naive_phase"] = phase
    for n, (name, extra) in enumerate(configs.items()):
        if phase == "separate":
            naive = naive or Naive(collection_model(artifacts), threads)
            local = naive_phase(naive, data[:n1])
            time.sleep(1.0)  # let this process's OpenMP threads go idle before the server runs
        proc, base = start_server(artifacts, env_for(onnx_cache, **extra))
        try:
            info = httpx.get(base + "/readyz").json()
            out["model"] = info.get("model")
            salt = b"\0" * (n + 1)  # trailing bytes after the JPEG: new cache keys, same pixels
            if phase == "separate":
                served_phase(base, data[:3], salt * 9)  # warm-up
                served = served_phase(base, data[:n1], salt)
            else:
                naive = naive or Naive(out["model"], threads)
                interleaved_c1(base, naive, data[:3], salt * 9)  # warm-up
                served, local = interleaved_c1(base, naive, data[:n1], salt)

            async def upload(client, i, salt=salt):
                d = data[n1 + i % (len(data) - n1)] + salt
                return await client.post("/search/image", files={"file": ("q.jpg", d, "image/jpeg")},
                                         data={"k": "10"})

            rc = asyncio.run(drive(base, upload, nc, clients, 600))
            out[name] = {"c1": served, "naive_c1": local, f"c{clients}": rc}
            log(f"image {name}: c=1 p50 {served.get('p50_ms')} ms (naive encode_image {local['p50_ms']} ms); "
                f"c={clients} {rc['throughput_rps']} req/s p99 {rc.get('p99_ms')} errors {rc['errors']}")
        finally:
            stop(proc)
    d, b = out["default"], out["before"]
    out["ratios"] = {
        "image_c1_p50_over_naive_p50": round(d["c1"]["p50_ms"] / d["naive_c1"]["p50_ms"], 3),
        "before_image_c1_p50_over_naive_p50": round(b["c1"]["p50_ms"] / b["naive_c1"]["p50_ms"], 3),
        f"throughput_c{clients}_default_over_before": round(d[f"c{clients}"]["throughput_rps"]
                                                            / b[f"c{clients}"]["throughput_rps"], 2),
        f"p99_c{clients}_default_over_before": round(d[f"c{clients}"]["p99_ms"] / b[f"c{clients}"]["p99_ms"], 2),
    }
    if "onnx" in out:
        o = out["onnx"]
        out["ratios"]["onnx_image_c1_p50_over_naive_p50"] = round(o["c1"]["p50_ms"] / o["naive_c1"]["p50_ms"], 3)
        out["ratios"][f"throughput_c{clients}_default_over_onnx"] = round(
            d[f"c{clients}"]["throughput_rps"] / o[f"c{clients}"]["throughput_rps"], 2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text-artifacts", type=Path)
    ap.add_argument("--image-artifacts", type=Path)
    ap.add_argument("--requests", type=int, default=300, help="rounds of the cached measurement")
    ap.add_argument("--image-requests", type=int, default=30, help="image uploads at one client")
    ap.add_argument("--concurrent-requests", type=int, default=96, help="image uploads at --clients")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--naive-phase", choices=("separate", "interleaved"), default="separate",
                    help="time the naive encode_image baseline alone before each server (default) or "
                         "interleaved with the uploads")
    ap.add_argument("--default-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment of the default server (e.g. CLIPSEARCH_IMAGE_BATCH_SIZE=16)")
    ap.add_argument("--onnx-config", action="store_true",
                    help="also run the server with CLIPSEARCH_IMAGE_BACKEND=onnx (the default before bf16)")
    ap.add_argument("--onnx-cache", type=Path, default=Path("/tmp/clipsearch-onnx-bench"))
    ap.add_argument("--data", type=Path, default=flickr8k_dir(), help=FLICKR8K_HELP + "; its photos are the uploads")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result: dict = {"benchmark": "speed_service", "env": machine_env(args.threads)}
    lines = []
    if args.text_artifacts:
        c = result["cached"] = bench_cached(args.text_artifacts, args.requests, args.onnx_cache)
        lines += ["| cached path (1 client, interleaved) | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['p50_ms']} | {v['p95_ms']} | {v['p99_ms']} |" for k, v in c.items()
                  if k not in ("ratios", "errors")]
        lines.append(json.dumps(c["ratios"]))
    if args.image_artifacts:
        im = result["image"] = bench_image(args.image_artifacts, args.image_requests, args.concurrent_requests,
                                           args.clients, args.threads, args.onnx_cache, args.naive_phase,
                                           args.onnx_config, dict(kv.split("=", 1) for kv in args.default_env),
                                           data=args.data)
        k = f"c{args.clients}"
        lines += ["| image config | c=1 p50 ms | c=1 p99 | c=%d req/s | c=%d p50 | c=%d p99 |"
                  % (args.clients, args.clients, args.clients), "|---|---|---|---|---|---|"]
        names = [n for n in ("before", "onnx", "default") if n in im]
        for name in names:
            r1, rc = im[name]["c1"], im[name][k]
            lines.append(f"| {name} | {r1.get('p50_ms')} | {r1.get('p99_ms')} | {rc['throughput_rps']} | "
                         f"{rc.get('p50_ms')} | {rc.get('p99_ms')} |")
        for name in names:
            nv = im[name]["naive_c1"]
            lines.append(f"| naive encode_image b1, {args.threads} threads ({im['naive_phase']}, {name}) | {nv['p50_ms']} | "
                         f"{nv['p99_ms']} | | | |")
        lines.append(json.dumps(im["ratios"]))
    finish(result, "\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
