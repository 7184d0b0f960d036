"""Take the README's screenshot of the search page (docs/screenshot.png) on a real collection.

    python scripts/screenshot.py --artifacts /path/to/artifacts [--query "a dog running on the beach"]
    python scripts/screenshot.py --url http://127.0.0.1:8000          # a service already running

With --artifacts it starts the service itself (`uvicorn app.main:app` on a free loopback port, the
artifacts only read), waits for /readyz, searches in headless Chromium through Selenium (the tooling
of tests/browser/), waits until every thumbnail has loaded, hovers one result so its captions show,
and writes the viewport as a PNG, reduced to a 256-colour palette so it stays small in the repository.
Needs chromium and chromedriver (Debian: apt-get install chromium chromium-driver) and selenium.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import httpx
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def service(artifacts: Path, ready_timeout: float):
    """The real service on 127.0.0.1 over `artifacts`, ready; stopped on exit."""
    port = free_port()
    env = {**os.environ, "ARTIFACTS_DIR": str(artifacts), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning"], cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the service exited with {proc.returncode}")
            try:
                r = httpx.get(url + "/readyz", timeout=5)
                if r.status_code == 200:
                    break
                reason = r.json().get("reason", "")
                if not reason.startswith("loading"):
                    raise SystemExit(f"the service is not ready: {reason}")
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"/readyz did not answer 200 within {ready_timeout:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def chromium(width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = os.environ.get("CHROMIUM_BIN") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("CHROMEDRIVER_BIN") or shutil.which("chromedriver")
    if not binary or not driver:
        raise SystemExit("needs chromium and chromedriver (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--hide-scrollbars", "--lang=en-US",
                "--force-device-scale-factor=1"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(driver))


def shoot(url: str, query: str, k: int, out: Path, width: int, height: int, timeout: float) -> dict:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium(width, height)
    try:
        driver.set_window_size(width, height)
        # the viewport, not the window, should be width x height
        inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
        driver.set_window_size(2 * width - inner[0], 2 * height - inner[1])
        driver.get(f"{url}/?q={quote(query)}&k={k}")
        wait = WebDriverWait(driver, timeout, poll_frequency=0.1)
        wait.until(lambda d: d.execute_script("return document.body.dataset.state") in ("done", "error"))
        error = driver.find_element(By.ID, "error").text
        if error:
            raise SystemExit(f"the page shows an error: {error}")
        loaded = ("return Array.from(document.querySelectorAll('#results img'))"
                  ".filter(i => i.getBoundingClientRect().top < innerHeight)"
                  ".every(i => i.complete && i.naturalWidth > 0)")
        wait.until(lambda d: d.execute_script(loaded))
        cards = driver.find_elements(By.CSS_SELECTOR, "#results .card .thumb")
        if len(cards) > 1:
            ActionChains(driver).move_to_element(cards[1]).perform()
            time.sleep(0.3)  # the captions fade in
        notice = driver.find_element(By.ID, "notice").text
        png = driver.get_screenshot_as_png()
    finally:
        driver.quit()
    image = Image.open(io.BytesIO(png)).convert("RGB")
    small = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    small.save(tmp, "PNG", optimize=True)
    tmp.replace(out)
    return {"out": str(out), "size": list(image.size), "bytes": out.stat().st_size, "notice": notice}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--artifacts", type=Path, help="ARTIFACTS_DIR to serve (only read)")
    where.add_argument("--url", help="a running service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--query", default="a dog running on the beach")
    parser.add_argument("--k", type=int, default=24)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshot.png")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--timeout", type=float, default=60, help="seconds for the search and thumbnails")
    parser.add_argument("--ready-timeout", type=float, default=600, help="seconds for the service to load")
    args = parser.parse_args(argv)
    if args.url:
        result = shoot(args.url.rstrip("/"), args.query, args.k, args.out, args.width, args.height, args.timeout)
    else:
        with service(args.artifacts, args.ready_timeout) as url:
            result = shoot(url, args.query, args.k, args.out, args.width, args.height, args.timeout)
    print(result)


if __name__ == "__main__":
    main()
