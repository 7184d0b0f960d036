"""The search page in headless Chromium against a running service: bytes and time to a result grid.

    python benchmarks/bench_page.py --url http://127.0.0.1:8000 [--query "a dog running on the beach"] [--runs 5]

For each run a fresh browser (cold cache) opens /?q=...; then the same browser reloads the page
(warm cache: the page and assets revalidate with 304s, thumbnails come from the cache). Reported from
the browser's own Resource Timing: bytes of the page and its assets, bytes of the thumbnails, whether
any full image was fetched, time to the result list (the search answered and the grid built) and to
every thumbnail in the first viewport decoded. Prints one JSON record and a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from screenshot import chromium  # noqa: E402 - the README screenshot's browser set-up

MEASURE = """
const entries = performance.getEntriesByType('resource').concat(performance.getEntriesByType('navigation'));
const path = (e) => new URL(e.name).pathname;
const page = entries.filter(e => path(e) === '/' || path(e).startsWith('/static/'));
const thumbs = entries.filter(e => path(e).startsWith('/thumbnails/'));
return {page_bytes: page.reduce((s, e) => s + e.transferSize, 0),
        page_body_bytes: page.reduce((s, e) => s + e.decodedBodySize, 0),
        thumbnail_count: thumbs.length,
        thumbnail_bytes: thumbs.reduce((s, e) => s + e.transferSize, 0),
        full_images_fetched: entries.filter(e => path(e).startsWith('/images/')).length};
"""
VISIBLE_LOADED = ("return Array.from(document.querySelectorAll('#results img'))"
                  ".filter(i => i.getBoundingClientRect().top < innerHeight)"
                  ".every(i => i.complete && i.naturalWidth > 0)")


def one_load(driver, url: str, timeout: float) -> dict:
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout, poll_frequency=0.005)
    t0 = time.perf_counter()
    driver.get(url)
    wait.until(lambda d: d.execute_script("return document.body.dataset.state") in ("done", "error"))
    t_results = time.perf_counter() - t0
    assert driver.execute_script("return document.body.dataset.state") == "done", "the search failed"
    wait.until(lambda d: d.execute_script(VISIBLE_LOADED))
    t_thumbs = time.perf_counter() - t0
    return {"to_results_ms": t_results * 1000, "to_thumbnails_ms": t_thumbs * 1000,
            **driver.execute_script(MEASURE)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--query", default="a dog running on the beach")
    parser.add_argument("--k", type=int, default=24)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args(argv)
    url = f"{args.url.rstrip('/')}/?q={quote(args.query)}&k={args.k}"
    cold, warm = [], []
    for _ in range(args.runs):
        driver = chromium(1280, 900)
        try:
            cold.append(one_load(driver, url, args.timeout))
            warm.append(one_load(driver, url, args.timeout))
        finally:
            driver.quit()

    def summary(rows: list[dict]) -> dict:
        return {key: statistics.median(r[key] for r in rows) for key in rows[0]}

    record = {"url": url, "runs": args.runs, "cold": summary(cold), "warm": summary(warm)}
    print(json.dumps(record))
    print(f"{'median of ' + str(args.runs):<14} {'to results':>11} {'to thumbs':>10} {'page bytes':>11} "
          f"{'thumbs':>7} {'thumb bytes':>12} {'full images':>12}")
    for name in ("cold", "warm"):
        s = record[name]
        print(f"{name:<14} {s['to_results_ms']:>8.0f} ms {s['to_thumbnails_ms']:>7.0f} ms {s['page_bytes']:>11.0f} "
              f"{s['thumbnail_count']:>7.0f} {s['thumbnail_bytes']:>12.0f} {s['full_images_fetched']:>12.0f}")


if __name__ == "__main__":
    main()
