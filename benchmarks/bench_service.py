"""Service latency and throughput over loopback: /search/text (uncached, cached) and /search/image at
concurrency 1, 4 and 16, plus micro-batching on vs off for uncached text at 16 clients.

    python benchmarks/bench_service.py --artifacts artifacts [--requests 200] [--out FILE]

Starts `uvicorn app.main:app` on 127.0.0.1 (a free port) for each server configuration, waits for
/readyz, then drives it with httpx async clients. Loopback only, bounded in count and time. Prints
JSON on stdout and a table on stderr. "HTTP + search overhead" of an uncached text query = its
client-side latency minus the encode time the server reports for it (`Server-Timing: encode;dur=`),
median over the one-client run, as a share of the median encode time. `GET /healthz` at one client
gives the floor of any answer (a loopback round trip through uvicorn and httpx).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import finish, loadavg  # noqa: E402

WORDS = ("dog cat man woman child girl boy bike ball beach snow grass water street park red blue "
         "black white brown running jumping sitting playing walking two three small large").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(artifacts: Path, env_extra: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "ARTIFACTS_DIR": str(artifacts), **env_extra}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("server exited: " + proc.stderr.read().decode()[-2000:])
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server not ready in 300 s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


async def drive(base: str, make_request, n: int, concurrency: int, time_limit: float) -> dict:
    lat: list[float] = []
    encode: list[float] = []    # server-reported encode ms of each answered request, where given
    overhead: list[float] = []  # its latency minus that encode time
    handler: list[float] = []   # the server's own time in the handler (`total;dur=`)
    errors: dict[int, int] = {}
    counter = iter(range(n))
    t_end = time.perf_counter() + time_limit
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        async def worker():
            for i in counter:
                if time.perf_counter() > t_end:
                    return
                t = time.perf_counter()
                r = await make_request(client, i)
                dt = time.perf_counter() - t
                if r.status_code == 200:
                    lat.append(dt)
                    timing = r.headers.get("server-timing", "")
                    total = stage_ms(timing, "total")
                    if total is not None:
                        handler.append(total)
                    enc = stage_ms(timing, "encode")
                    if enc is not None:
                        encode.append(enc)
                        overhead.append(dt * 1000 - enc)
                else:
                    errors[r.status_code] = errors.get(r.status_code, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    a = np.array(lat) * 1000
    return {"n_ok": len(lat), "errors": errors, "wall_s": round(wall, 2),
            "throughput_rps": round(len(lat) / wall, 2),
            **({f"p{q}_ms": round(float(np.percentile(a, q)), 2) for q in (50, 95, 99)} if len(a) else {}),
            **({"server_handler_p50_ms": round(float(np.median(handler)), 3)} if handler else {}),
            **({"server_encode_p50_ms": round(float(np.median(encode)), 2),
                "overhead_p50_ms": round(float(np.median(overhead)), 2)} if encode else {})}


def stage_ms(header: str, stage: str) -> float | None:
    """The `dur` of one metric of a Server-Timing header, in ms."""
    for part in header.split(","):
        name, _, params = part.strip().partition(";")
        if name == stage:
            m = re.search(r"dur=([0-9.]+)", params)
            return float(m.group(1)) if m else None
    return None


def unique_query(i: int, rng: random.Random) -> str:
    return f"a {' '.join(rng.sample(WORDS, 5))} number {i}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--requests", type=int, default=200, help="requests per measurement")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--time-limit", type=float, default=120, help="seconds per measurement, at most")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    records = [json.loads(l) for l in (args.artifacts / "splits" / f"{args.split}.jsonl").read_text().splitlines()]
    image_paths = sorted({r["image_path"] for r in records})
    images = [Path(p).read_bytes() for p in image_paths]
    rng = random.Random(0)
    result = {"env": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                      "loadavg_start": loadavg()}, "artifacts": str(args.artifacts), "runs": []}

    def text_req(cached: bool, k: int = 10):
        async def make(client, i):
            q = "a dog runs on the beach" if cached else unique_query(i, rng)
            return await client.post("/search/text", json={"query": q, "k": k})
        return make

    offset = [0]

    def image_req():
        base_i = offset[0]
        offset[0] += args.requests  # every measurement uploads images not seen before (no cache hits)

        async def make(client, i):
            data = images[(base_i + i) % len(images)]
            return await client.post("/search/image", files={"file": ("q.jpg", data, "image/jpeg")},
                                     data={"k": "10"})
        return make

    for batching in (16, 1):
        proc, base = start_server(args.artifacts, {"CLIPSEARCH_TEXT_BATCH_SIZE": str(batching),
                                                   "CLIPSEARCH_CACHE_SIZE": "100000"})
        try:
            info = httpx.get(base + "/readyz").json()
            result["model"] = info.get("model")
            # warm-up: model, tokenizer and caches
            asyncio.run(drive(base, text_req(False), 10, 1, 60))
            asyncio.run(drive(base, image_req(), 3, 1, 60))
            if batching != 1:
                # the floor of any answer here: a loopback round trip to a handler that does nothing
                async def healthz(client, i):
                    return await client.get("/healthz")
                r = asyncio.run(drive(base, healthz, args.requests, 1, args.time_limit))
                r.update({"endpoint": "healthz", "concurrency": 1, "text_batch_size": batching})
                result["runs"].append(r)
                print(f"batch={batching:<3} {'healthz':<14} c=1   p50={r.get('p50_ms')} p95={r.get('p95_ms')} "
                      f"p99={r.get('p99_ms')} rps={r['throughput_rps']}", file=sys.stderr)
            concs = args.concurrency if batching != 1 else [max(args.concurrency)]
            for c in concs:
                for name, maker in (("text_uncached", text_req(False)), ("text_cached", text_req(True)),
                                    ("image", image_req())):
                    if batching == 1 and name != "text_uncached":
                        continue
                    r = asyncio.run(drive(base, maker, args.requests, c, args.time_limit))
                    r.update({"endpoint": name, "concurrency": c, "text_batch_size": batching})
                    result["runs"].append(r)
                    print(f"batch={batching:<3} {name:<14} c={c:<3} p50={r.get('p50_ms')} p95={r.get('p95_ms')} "
                          f"p99={r.get('p99_ms')} rps={r['throughput_rps']} errors={r['errors']}", file=sys.stderr)
        finally:
            stop(proc)

    def run(name, c, b):
        return next(r for r in result["runs"] if r["endpoint"] == name and r["concurrency"] == c
                    and r["text_batch_size"] == b)

    c1 = min(args.concurrency)
    cmax = max(args.concurrency)
    unc, cac = run("text_uncached", c1, 16), run("text_cached", c1, 16)
    on, off = run("text_uncached", cmax, 16), run("text_uncached", cmax, 1)
    enc = unc.get("server_encode_p50_ms")
    result["ratios"] = {
        "cached_speedup_p50": round(unc["p50_ms"] / cac["p50_ms"], 1),
        "cached_p50_over_healthz_p50": round(cac["p50_ms"] / run("healthz", 1, 16)["p50_ms"], 2),
        "cached_server_handler_p50_ms": cac.get("server_handler_p50_ms"),
        "overhead_share_of_encode": round(unc["overhead_p50_ms"] / enc, 3) if enc else None,
        "batching_throughput_gain": round(on["throughput_rps"] / off["throughput_rps"], 2),
        "batching_p99_ratio": round(on["p99_ms"] / off["p99_ms"], 2),
    }
    finish(result, json.dumps(result["ratios"]), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
