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
