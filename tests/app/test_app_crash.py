"""The write service killed for real: a uvicorn subprocess (tests/app/serve_writable.py, fake encoder,
a collection on disk with HNSW graphs and a low compaction threshold) receives uploads, deletes and
compactions from several clients and is SIGKILLed at random moments, during writes and during
compactions. After every restart, start-up succeeds, every acknowledged upload is found by image ->
image search at rank 1 and no acknowledged delete is found. A second test drives writes and searches
at once and sees no server error.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

SCRIPT = Path(__file__).with_name("serve_writable.py")
TOKEN = "test-admin-token-0123456789"  # serve_writable.ADMIN_TOKEN: writes and compactions
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# HNSW graphs from 5 rows up, and a compaction after every few writes, so kills land inside them.
# efSearch above any row count reached here: the walk covers all the graph reaches, so rank 1 depends
# only on what was stored and on the rows the graph cannot reach being searched beside it (a fake
# vector's own row cut off from the graph failed this test once in ~12 runs: clipsearch/unreachable.py)
CRASH_SETTINGS = ("exact_max=4", "compact_tombstones=3", "compact_delta=4", "refresh_interval_ms=0",
                  "write_max_in_flight=4", "hnsw_ef_search=1000")


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, "PNG")
    return buf.getvalue()


class Server:
    def __init__(self, artifacts: Path, log: Path, settings: tuple[str, ...]):
        args = [a for s in settings for a in ("--set", s)]
        self._log = open(log, "ab")
        self.log_path = log
        self.proc = subprocess.Popen([sys.executable, str(SCRIPT), str(artifacts), *args],
                                     stdout=subprocess.PIPE, stderr=self._log,
                                     env={**os.environ, "PYTHONPATH": str(SCRIPT.parents[2])})
        line = self.proc.stdout.readline().decode()  # type: ignore[union-attr]
        assert line.startswith("PORT "), (line, self.log())
        self.url = f"http://127.0.0.1:{int(line.split()[1])}"

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-3000:]

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"server exited:\n{self.log()}"
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"never ready:\n{self.log()}"
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.close()

    def close(self) -> None:
        if self.proc.stdout:
            self.proc.stdout.close()
        self._log.close()


@pytest.fixture
def servers():
    started: list[Server] = []
    yield started
    for s in started:
        s.stop()


class Ledger:
    """What the clients were told: acknowledged uploads (id -> bytes) and deletes; in-flight ones are unknown."""

    def __init__(self) -> None:
        self.live: dict[str, bytes] = {}
        self.gone: set[str] = set()
        self.lock = threading.Lock()
        self.statuses: Counter = Counter()


def _client_loop(url: str, ledger: Ledger, seed: int, stop: threading.Event, counter: list[int]) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=10, headers=AUTH) as client:
        while not stop.is_set():
            x = rng.random()
            try:
                if x < 0.7:
                    with ledger.lock:
                        counter[0] += 1
                        n = counter[0]
                    data = _png(n)
                    r = client.post("/collections/test/media", files={"file": ("a.png", data, "image/png")},
                                    data={"caption": f"upload {n}"})
                    if r.status_code in (200, 201):
                        with ledger.lock:
                            ledger.live[r.json()["image_id"]] = data
                elif x < 0.9:
                    with ledger.lock:
                        if not ledger.live:
                            continue
                        victim = rng.choice(sorted(ledger.live))
                        ledger.live.pop(victim)  # from now on it may be gone, acknowledged or not
                    r = client.delete(f"/collections/test/media/{victim}")
                    if r.status_code == 204:
                        with ledger.lock:
                            ledger.gone.add(victim)
                else:
                    r = client.post("/collections/test/compact")
                ledger.statuses[r.status_code] += 1
            except httpx.TransportError:
                return  # the server was killed under us: whatever was in flight is unknown


def _compact_once(url: str) -> None:
    try:
        httpx.post(url + "/collections/test/compact", headers=AUTH, timeout=10)
    except httpx.TransportError:
        pass  # killed mid-request, as intended


def _verify(url: str, ledger: Ledger) -> None:
    with httpx.Client(base_url=url, timeout=30, headers=AUTH) as client:
        for image_id, data in sorted(ledger.live.items()):
            r = client.post("/search/image", files={"file": ("q.png", data, "image/png")}, data={"k": "1"})
            assert r.status_code == 200, r.text
            assert r.json()["results"][0]["image_id"] == image_id, (image_id, r.json()["results"])
        for image_id in ledger.gone:
            assert client.get(f"/collections/test/items/{image_id}").status_code == 404


def test_sigkill_during_writes_and_compactions_loses_nothing_acknowledged(servers, tmp_path):
    rng = random.Random(12)
    artifacts = tmp_path / "artifacts"
    ledger = Ledger()
    counter = [0]
    kills = 0
    for round_ in range(3):  # 4 server starts in all (each imports torch: ~5-13 s here)
        server = Server(artifacts, tmp_path / "server.log", CRASH_SETTINGS)
        servers.append(server)
        server.wait_ready()
        _verify(server.url, ledger)  # every acknowledged write survived the last kill
        stop = threading.Event()
        threads = [threading.Thread(target=_client_loop, args=(server.url, ledger, round_ * 10 + i, stop, counter))
                   for i in range(3)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.8, 2.0))
        if round_ == 1:  # aim one kill at a compaction in progress
            threading.Thread(target=_compact_once, args=(server.url,), daemon=True).start()
            time.sleep(rng.uniform(0.0, 0.02))
        server.kill()
        kills += 1
        stop.set()
        for t in threads:
            t.join(15)
    server = Server(artifacts, tmp_path / "server.log", CRASH_SETTINGS)
    servers.append(server)
    server.wait_ready()
    _verify(server.url, ledger)
    assert kills == 3 and len(ledger.live) >= 5, ledger.statuses
    assert ledger.statuses[201] >= 6 and ledger.statuses[204] >= 1, ledger.statuses
    assert not {s for s in ledger.statuses if s >= 500}, ledger.statuses


def test_writes_and_searches_together_have_no_server_errors(servers, tmp_path):
    server = Server(tmp_path / "artifacts", tmp_path / "server.log",
                    ("compact_tombstones=5", "compact_delta=10", "exact_max=8", "write_max_in_flight=2"))
    servers.append(server)
    server.wait_ready()
    statuses: Counter = Counter()
    uploaded: list[str] = []

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30, headers=AUTH) as client:
            async def writer(w: int) -> None:
                for i in range(25):
                    data = _png(1000 + w * 100 + i)
                    r = await client.post("/collections/test/media", headers=AUTH,
                                          files={"file": ("a.png", data, "image/png")})
                    statuses[("write", r.status_code)] += 1
                    if r.status_code in (200, 201):
                        uploaded.append(r.json()["image_id"])
                        if i % 4 == 3:
                            d = await client.delete(f"/collections/test/media/{uploaded.pop(0)}", headers=AUTH)
                            statuses[("delete", d.status_code)] += 1

            async def searcher(s: int) -> None:
                for i in range(40):
                    if i % 2:
                        r = await client.post("/search/text", json={"query": f"red square {s} {i}", "k": 5})
                    else:
                        r = await client.post("/search/image", files={"file": ("q.png", _png(s * 1000 + i), "image/png")})
                    statuses[("search", r.status_code)] += 1

            await asyncio.gather(*(writer(w) for w in range(3)), *(searcher(s) for s in range(3)))

    asyncio.run(scenario())
    assert not [k for k in statuses if k[1] >= 500], statuses
    assert statuses[("search", 200)] == 120, statuses  # searches are never turned away by writes
    assert statuses[("write", 201)] >= 25, statuses  # the write bound may answer some 429s, not all
    assert set(statuses) <= {("write", 201), ("write", 429), ("delete", 204), ("delete", 429),
                             ("search", 200)}, statuses
