"""`clipsearch serve` end to end: it serves what the artifacts folder holds on 127.0.0.1, and SIGTERM
stops it. Here, beside the service tests, for their tiny collection fixture."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_serves_the_artifacts_and_stops_on_sigterm(tmp_path, tiny_checkpoint, fakes, dataset):
    root = fakes.build_artifacts(tmp_path / "art", dataset, pretrained=str(tiny_checkpoint))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSEARCH_") and k not in ("HOST", "PORT")}
    env.update(PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
               CLIPSEARCH_TORCH_THREADS="1", CLIPSEARCH_TEXT_BACKEND="torch", CLIPSEARCH_IMAGE_BACKEND="torch")
    proc = subprocess.Popen([sys.executable, "-m", "offline.console", "serve", "--out", str(root), "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ready = None
        for _ in range(600):
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.1)
        assert ready is not None and ready.status_code == 200, ready and ready.text
        hits = httpx.post(f"http://127.0.0.1:{port}/search/text", json={"query": "a plain red square", "k": 3},
                          timeout=30).json()["results"]
        assert len(hits) == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode in (0, 128 + signal.SIGTERM), out[-2000:]
    assert f"serving on http://127.0.0.1:{port}" in out


def _png(seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_serve_a_folder_watches_it(tmp_path, tiny_checkpoint):
    """`clipsearch serve DIR`: the folder is ingested, served, and a photo copied in later is found
    without a restart (the watcher child beside uvicorn); SIGTERM stops both."""
    photos, art = tmp_path / "photos", tmp_path / "art"
    photos.mkdir()
    for i in range(3):
        (photos / f"p{i}.png").write_bytes(_png(i))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSEARCH_") and k not in ("HOST", "PORT")}
    env.update(PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
               CLIPSEARCH_TORCH_THREADS="1", CLIPSEARCH_TEXT_BACKEND="torch", CLIPSEARCH_IMAGE_BACKEND="torch",
               CLIPSEARCH_REFRESH_INTERVAL_MS="100")
    cmd = [sys.executable, "-m", "offline.console", "serve", str(photos), "--out", str(art), "--port", str(port),
           "--model", "test-tiny-vit", "--pretrained", str(tiny_checkpoint)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def images() -> int | None:
        try:
            got = httpx.get(f"http://127.0.0.1:{port}/collections", timeout=2)
        except httpx.HTTPError:
            return None
        return got.json()["collections"][0]["images"] if got.status_code == 200 else None

    try:
        deadline = time.monotonic() + 180
        while images() != 3:
            assert proc.poll() is None and time.monotonic() < deadline, "the folder was never served"
            time.sleep(0.1)
        (photos / "later.png").write_bytes(_png(99))
        deadline = time.monotonic() + 60
        while images() != 4:
            assert proc.poll() is None and time.monotonic() < deadline, "a photo copied in was never found"
            time.sleep(0.1)
        hit = httpx.post(f"http://127.0.0.1:{port}/search/image", files={"file": ("q.png", _png(99), "image/png")},
                         timeout=30).json()["results"][0]
        assert hit["image_id"].endswith("later.png")
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode in (0, 128 + signal.SIGTERM), out[-2000:]
    assert "watch" in out
