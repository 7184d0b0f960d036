"""What every benchmark script shares: a timestamped log on stderr, the record of the machine and its
load, and the epilogue (the JSON on stdout, the table on stderr, the JSON in `--out`).

The scripts put the repository root on `sys.path` and import this as `benchmarks._common`.
"""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any


REPO = Path(__file__).resolve().parents[1]
FLICKR8K_ENV = "CLIPSEARCH_FLICKR8K"
FLICKR8K_HELP = ("a Flickr8k copy (original or Kaggle layout; default: $CLIPSEARCH_FLICKR8K, else ../shared/flickr8k "
                 "beside the repository)")


def flickr8k_dir() -> Path:
    """Where the Flickr8k copy is: $CLIPSEARCH_FLICKR8K, else ../shared/flickr8k next to the repository."""
    return Path(os.environ.get(FLICKR8K_ENV) or REPO.parent / "shared" / "flickr8k")


def flickr8k_images(data: Path) -> Path:
    """The folder of JPEGs inside a Flickr8k copy (Images/ or the original Flicker8k_Dataset/)."""
    for name in ("Images", "Flicker8k_Dataset"):
        if (data / name).is_dir():
            return data / name
    return data


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine_env(threads: int, **versions: Any) -> dict[str, Any]:
    """The run's `env` record: machine, cores, the thread count under test, library versions, and the
    load average at the start (`load_high`: above the core count, so timings are noisy — said on
    stderr too)."""
    load = loadavg()
    env = {"machine": platform.machine(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "threads": threads, **versions, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
           "loadavg_start": load, "load_high": load[0] > (os.cpu_count() or 1)}
    if env["load_high"]:
        log(f"WARNING: load average {load} exceeds the core count; timings are noisy")
    return env


def write_json(path: Path | None, result: dict[str, Any]) -> None:
    """`result` as indented JSON in `path` (a finished run, or what a long one has so far); no-op for None."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")


def finish(result: dict[str, Any], table: str, out: Path | None) -> dict[str, Any]:
    """Record the load at the end, print the JSON, log `table`, write `out`; returns `result`."""
    result.setdefault("env", {})["loadavg_end"] = loadavg()
    print(json.dumps(result, indent=2))
    log("\n" + table)
    write_json(out, result)
    return result


def catalog_rows(catalog: Path) -> int | None:
    """Items in a collection's catalog, read-only while an ingest writes it; None when there is none yet
    or it cannot be read at this moment."""
    if not catalog.is_file():
        return None
    try:
        con = sqlite3.connect(f"file:{catalog}?mode=ro", uri=True, timeout=0.5)
        try:
            return int(con.execute("SELECT COUNT(*) FROM items").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return None
