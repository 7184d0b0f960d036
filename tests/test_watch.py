"""`offline watch`: a folder kept in step with its collection while files come, change, move and go.

Tiny random-noise photos (no two alike) and the real tiny open_clip model; every wait is a deadline
on an observable state (the catalog, the status file), never a sleep that decides the outcome.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.artifacts import ArtifactLayout
from clipsearch.models import load_model
from clipsearch.store import Catalog, FaissStore
from clipsearch.store.bad_files import read_bad_files
from clipsearch.watch_status import read_watch_status
from offline import watch as watch_mod
from offline.ingest import ingest
from offline.watch import Watcher, WatchOptions, choose_mode

DEADLINE_S = 30.0


@pytest.fixture(scope="module")
def tiny_model():
    return load_model("test-tiny-vit", None, device="cpu")


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _photo(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png(seed))
    return path


def settled(w: Watcher, predicate: Callable[[], object], what: str) -> None:
    """Wait for `predicate`, then for the pass that made it true to finish (its counters counted)."""
    wait_for(predicate, what)
    wait_for(lambda: w.idle, f"the watcher idle after: {what}")


def wait_for(predicate: Callable[[], object], what: str, timeout: float = DEADLINE_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def states(out: Path, name: str = "photos") -> dict:
    path = ArtifactLayout(out).collection(name).catalog
    if not path.is_file():
        return {}
    with Catalog(path, readonly=True) as cat:
        return cat.states()


def vectors(out: Path, name: str = "photos") -> dict[str, np.ndarray]:
    with Catalog(ArtifactLayout(out).collection(name).catalog, readonly=True) as cat:
        rows = cat.rows()
    return {i: rows.vectors[k] for k, i in enumerate(rows.image_ids)}


def status(out: Path, name: str = "photos") -> dict | None:
    return read_watch_status(ArtifactLayout(out).collection(name).watch_status)


@contextmanager
def watching(src: Path, out: Path, loaded, **opts) -> Iterator[Watcher]:
    options = WatchOptions(**{"quiet_s": 0.3, "image_backend": "torch", "batch_size": 8, "heartbeat_s": 0.5,
                              "debounce_ms": 100, "poll_interval_s": 0.2, **opts})
    w = Watcher(src, out, "photos", loaded, options)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(w.run()), daemon=True)
    thread.start()
    try:
        wait_for(lambda: w.idle, "the first scan, with every file settled")
        yield w
    finally:
        w.request_stop()
        thread.join(timeout=DEADLINE_S)
        assert not thread.is_alive(), "the watcher did not stop"


def test_add_change_delete(tmp_path, tiny_model):
    src, out = tmp_path / "photos", tmp_path / "art"
    _photo(src / "a.png", 0)
    _photo(src / "b.png", 1)
    with watching(src, out, tiny_model) as w:
        assert set(states(out)) == {"a.png", "b.png"}
        _photo(src / "c.png", 2)
        wait_for(lambda: "c.png" in states(out), "the new file ingested")
        old = states(out)["a.png"].sha256
        _photo(src / "a.png", 10)  # new pixels, same name
        wait_for(lambda: states(out)["a.png"].sha256 != old, "the changed file re-embedded")
        (src / "b.png").unlink()
        settled(w, lambda: "b.png" not in states(out), "the removed file's item gone")
        assert w.counters.values["ingested"] == 4 and w.counters.values["removed"] == 1
        assert w.counters.values["events"] >= 3
        live = status(out)
        assert live["mode"] in ("events", "polling") and live["pid"] == os.getpid() and live["bad_files"] == []
    assert status(out) is None  # stopped: no status to show
    assert json.loads(ArtifactLayout(out).collection("photos").watch_status.read_text())["state"] == "stopped"


def test_renames_and_moves_embed_nothing(tmp_path, tiny_model):
    src, out = tmp_path / "photos", tmp_path / "art"
    for i in range(4):
        _photo(src / "trip" / f"t{i}.png", i)
    _photo(src / "one.png", 9)
    _photo(src / "a" / "x.png", 8)
    with watching(src, out, tiny_model) as w:
        before = vectors(out)
        embedded = w.counters.values["ingested"]
        assert embedded == 6
        served = FaissStore.open(ArtifactLayout(out).collection("photos"), readonly=True)  # as the service holds it
        assert len(served.ids()) == 6
        (src / "one.png").rename(src / "uno.png")  # a file renamed
        (src / "trip").rename(src / "trip-2019")  # a folder renamed with its photos
        (src / "b").mkdir()
        (src / "a" / "x.png").rename(src / "b" / "x.png")  # moved across subfolders
        want = {"uno.png", "b/x.png", *(f"trip-2019/t{i}.png" for i in range(4))}
        settled(w, lambda: set(states(out)) == want, "the moves applied")
        assert w.counters.values["ingested"] == embedded  # not one embedded
        assert w.counters.values["relinked"] == 6
        after = vectors(out)
        np.testing.assert_array_equal(after["uno.png"], before["one.png"])
        np.testing.assert_array_equal(after["trip-2019/t2.png"], before["trip/t2.png"])
        np.testing.assert_array_equal(after["b/x.png"], before["a/x.png"])
        st = states(out)
        assert st["b/x.png"].metadata["folder"] == "b" and st["b/x.png"].path == str((src / "b/x.png").resolve())
        assert st["trip-2019/t0.png"].metadata["folder"] == "trip-2019"
        assert served.refresh()  # the service's poll: the moves arrive as commits it applies
        assert sorted(served.ids()) == sorted(want)
        assert served.search(after["uno.png"], 1)[0].image_id == "uno.png"
        assert served.get("trip-2019/t1.png").metadata["folder"] == "trip-2019"
        served.close()
    # what a reader of the collection serves: the new paths, found by their own vectors
    store = FaissStore.open(ArtifactLayout(out).collection("photos"), readonly=True)
    hit = store.search(after["b/x.png"], 1)[0]
    assert hit.image_id == "b/x.png" and store.get("b/x.png").path.endswith("b/x.png")
    store.close()


def test_half_written_file_is_not_read_half_way(tmp_path, tiny_model):
    src, out = tmp_path / "photos", tmp_path / "art"
    _photo(src / "a.png", 0)
    data = _png(5)
    with watching(src, out, tiny_model, quiet_s=1.0) as w:
        with open(src / "slow.png", "wb") as fh:  # a slow copy: half, a pause shorter than quiet_s, the rest
            fh.write(data[: len(data) // 2])
            fh.flush()
            time.sleep(0.4)
            fh.write(data[len(data) // 2:])
        settled(w, lambda: "slow.png" in states(out), "the finished file ingested")
        assert states(out)["slow.png"].sha256 == hashlib.sha256(data).hexdigest()
        assert w.counters.values["ingested"] == 2 and w.counters.values["skipped"] == 0
        assert read_bad_files(Catalog(ArtifactLayout(out).collection("photos").catalog, readonly=True)) == {}


def test_broken_file_retried_then_parked_until_it_changes(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(watch_mod, "RETRY_S", 0.2)
    src, out = tmp_path / "photos", tmp_path / "art"
    _photo(src / "a.png", 0)
    with watching(src, out, tiny_model, max_tries=2) as w:
        (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        parked = wait_for(lambda: [b for b in (status(out) or {}).get("bad_files", []) if b["parked"]],
                          "the broken file parked after its tries")
        assert parked == [{**parked[0], "path": "broken.png", "tries": 2}]
        assert str(tmp_path) not in json.dumps(status(out))  # names relative to the watched folder
        cycles = w.counters.values["cycles"]
        _photo(src / "c.png", 3)  # another pass: the parked file is not tried again
        wait_for(lambda: "c.png" in states(out) and w.counters.values["cycles"] > cycles, "the next pass")
        with Catalog(ArtifactLayout(out).collection("photos").catalog, readonly=True) as cat:
            assert read_bad_files(cat)["broken.png"].tries == 2
        _photo(src / "broken.png", 7)  # fixed: it changed, so it is read again
        wait_for(lambda: "broken.png" in states(out), "the fixed file ingested")
        wait_for(lambda: status(out) and status(out)["bad_files"] == [], "the bad list emptied")


def test_polling_mode_forced(tmp_path, tiny_model):
    src, out = tmp_path / "photos", tmp_path / "art"
    _photo(src / "a.png", 0)
    with watching(src, out, tiny_model, force_polling=True) as w:
        assert w.polling and "asked" in w.mode_reason
        _photo(src / "sub" / "b.png", 1)
        wait_for(lambda: "sub/b.png" in states(out), "a polled change ingested")
        assert status(out)["mode"] == "polling" and status(out)["poll_interval_s"] == 0.2


def test_mode_choice_network_mount_and_inotify_limit(tmp_path):
    (tmp_path / "x" / "y").mkdir(parents=True)
    mounts = tmp_path / "mounts"
    mounts.write_text(f"server:/export {tmp_path} nfs4 rw 0 0\n/dev/sda1 / ext4 rw 0 0\n")
    polling, why = choose_mode(tmp_path / "x", False, mounts=str(mounts))
    assert polling and "nfs4" in why
    mounts.write_text("/dev/sda1 / ext4 rw 0 0\n")
    limit = tmp_path / "limit"
    limit.write_text("2\n")
    polling, why = choose_mode(tmp_path / "x", False, mounts=str(mounts), max_watches=str(limit))
    assert polling and "max_user_watches" in why
    limit.write_text("100000\n")
    assert choose_mode(tmp_path / "x", False, mounts=str(mounts), max_watches=str(limit))[0] is False


def test_burst_is_batched_and_a_removed_folder_goes_in_one_commit(tmp_path, tiny_model, monkeypatch):
    import offline.ingest as ing

    src, out = tmp_path / "photos", tmp_path / "art"
    _photo(src / "a.png", 0)
    forwards: list[int] = []
    real = ing.ClipEncoder.encode_pixels

    def spy(self, pixels):
        forwards.append(len(pixels))
        return real(self, pixels)

    monkeypatch.setattr(ing.ClipEncoder, "encode_pixels", spy)
    with watching(src, out, tiny_model) as w:
        staging = tmp_path / "staging"
        for i in range(40):
            _photo(staging / f"b{i}.png", 100 + i)
        staging.rename(src / "burst")  # 40 files arrive at once
        wait_for(lambda: len(states(out)) == 41, "the burst ingested")
        assert sum(forwards) == 41 and len(forwards) < 20  # batches of up to 8, not one forward per file
        seq_before = Catalog(ArtifactLayout(out).collection("photos").catalog, readonly=True).seq
        deletes = []
        real_delete = Catalog.delete
        monkeypatch.setattr(Catalog, "delete", lambda self, ids: deletes.append(list(ids)) or real_delete(self, ids))
        import shutil

        shutil.rmtree(src / "burst")
        settled(w, lambda: len(states(out)) == 1, "the folder's items removed")
        assert [len(d) for d in deletes if d] == [40]
        assert Catalog(ArtifactLayout(out).collection("photos").catalog, readonly=True).seq > seq_before
        assert w.counters.values["removed"] == 40


def test_restart_in_the_middle_of_a_burst_loses_nothing(tmp_path):
    src, out = tmp_path / "photos", tmp_path / "art"
    _photo(src / "a.png", 0)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "offline", "watch", str(src), "--out", str(out), "--collection", "photos",
           "--model", "test-tiny-vit", "--pretrained", "none", "--image-backend", "torch", "--quiet-s", "0.2",
           "--batch-size", "4"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (status(out) or {}).get("last_scan"), "the first scan of the CLI watcher", 120)
        for i in range(150):
            _photo(src / "burst" / f"b{i}.png", 200 + i)
        wait_for(lambda: len(states(out)) > 1, "the burst's first commit")
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "SIGTERM" in output and "mode (" in output
    stopped = json.loads(ArtifactLayout(out).collection("photos").watch_status.read_text())
    assert stopped["state"] == "stopped"
    ingested_before = stopped["counters"]["ingested"]
    kept = len(states(out))
    loaded = load_model("test-tiny-vit", None, device="cpu")
    with watching(src, out, loaded) as w:  # the restart: its first scan finds the rest
        assert len(states(out)) == 151
        # nothing committed before the stop was embedded again
        assert w.counters.values["ingested"] == 151 - kept
    assert ingested_before >= kept - 1


def test_ingest_reports_a_bad_file_unchanged_and_follows_moves(tmp_path, tiny_model):
    src, out = tmp_path / "photos", tmp_path / "art"
    for i in range(5):
        _photo(src / "sub" / f"p{i}.png", i)
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (src / "broken2.png").write_bytes(b"nope")
    (src / "dup.png").write_bytes((src / "sub" / "p1.png").read_bytes())  # a copy: embedded once

    def run():
        return ingest(src, out, "photos", tiny_model, batch_size=4, image_backend="torch", text_backend="torch")

    first = run()
    assert (first["new"], first["copied"], first["embedded"], first["skipped"]) == (7, 1, 5, 2)
    again = run()
    assert (again["new"], again["bad_unchanged"], again["embedded"], again["skipped"]) == (0, 2, 0, 2)
    os.utime(src / "broken.jpg", ns=(5, 5))  # touched, same bytes: still bad (unchanged)
    assert run()["bad_unchanged"] == 2
    _photo(src / "broken.jpg", 50)  # fixed
    fixed = run()
    assert (fixed["new"], fixed["retried"], fixed["embedded"], fixed["bad_unchanged"]) == (1, 1, 1, 1)
    # a renamed folder and a copy: nothing embedded, the items follow
    before = vectors(out)
    (src / "sub").rename(src / "renamed")
    (src / "copy.png").write_bytes((src / "renamed" / "p0.png").read_bytes())
    moved = run()
    assert (moved["moved"], moved["copied"], moved["embedded"], moved["new"], moved["removed"]) == (5, 1, 0, 0, 0)
    after = vectors(out)
    assert set(after) == {"broken.jpg", "copy.png", "dup.png", *(f"renamed/p{i}.png" for i in range(5))}
    np.testing.assert_array_equal(after["dup.png"], after["renamed/p1.png"])
    np.testing.assert_array_equal(after["renamed/p3.png"], before["sub/p3.png"])
    np.testing.assert_array_equal(after["copy.png"], before["sub/p0.png"])
    assert states(out)["renamed/p3.png"].metadata["folder"] == "renamed"


def test_service_picks_up_a_watched_photo_and_shows_the_watch(tmp_path, tiny_checkpoint, make_client_for_watch):
    src, out = tmp_path / "photos", tmp_path / "art"
    _photo(src / "a.png", 0)
    # weights from a file: the service loads the very same ones (the catalog names the checkpoint)
    loaded = load_model("test-tiny-vit", str(tiny_checkpoint), device="cpu")
    with watching(src, out, loaded) as w:
        client = make_client_for_watch(out)
        listed = client.get("/collections").json()["collections"]
        assert listed[0]["watch"]["mode"] == ("polling" if w.polling else "events")
        assert listed[0]["watch"]["counters"]["ingested"] == 1
        new = _photo(src / "new.png", 77).read_bytes()

        def found() -> bool:
            r = client.post("/search/image", files={"file": ("q.png", new, "image/png")}, data={"k": "1"})
            return r.status_code == 200 and r.json()["results"][0]["image_id"] == "new.png"

        wait_for(found, "the new photo found by /search/image")
        metrics = client.get("/metrics").text
        assert 'clipsearch_watch_ingested_total{collection="photos"} 2.0' in metrics
    assert client.get("/collections").json()["collections"][0]["watch"] is None


@pytest.fixture
def make_client_for_watch():
    from fastapi.testclient import TestClient

    from app.config import Settings
    from app.main import create_app

    clients = []

    def make(out: Path):
        settings = Settings(artifacts_dir=out, torch_threads=1, inference_threads=1, device="cpu",
                            refresh_interval_ms=100)
        client = TestClient(create_app(settings), client=("127.0.0.1", 50000))  # loopback: no key configured
        client.__enter__()
        clients.append(client)
        wait_for(lambda: client.get("/readyz").status_code == 200, "the service ready", 60)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def test_event_watcher_failure_falls_back_to_polling(tmp_path, tiny_model, monkeypatch):
    """inotify out of watches (the error watchfiles raises then): one line says so, polling takes over."""
    import watchfiles

    real = watchfiles.watch

    def limited(*a, **kw):
        if not kw.get("force_polling"):
            raise OSError("OS file watch limit reached")
        return real(*a, **kw)

    monkeypatch.setattr(watchfiles, "watch", limited)
    src, out = tmp_path / "photos", tmp_path / "art"
    _photo(src / "a.png", 0)
    with watching(src, out, tiny_model) as w:
        wait_for(lambda: w.polling, "the switch to polling")
        assert "watch limit" in w.mode_reason
        _photo(src / "b.png", 1)
        wait_for(lambda: "b.png" in states(out), "a change seen by polling")
        assert status(out)["mode"] == "polling"


def test_watch_cli_rejects_a_missing_folder(tmp_path, capsys):
    from offline.cli import main

    code = main(["watch", str(tmp_path / "nope"), "--out", str(tmp_path / "art"), "--model", "test-tiny-vit",
                 "--pretrained", "none"])
    assert code == 2 and "is not a folder" in capsys.readouterr().err


def test_a_failed_pass_is_retried_not_fatal(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(watch_mod, "RETRY_S", 0.1)
    src, out = tmp_path / "photos", tmp_path / "art"
    _photo(src / "a.png", 0)
    calls = {"n": 0}
    import offline.ingest as ing

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return ing.ingest(*a, **kw)

    options = WatchOptions(quiet_s=0.2, image_backend="torch", heartbeat_s=0.5, debounce_ms=100)
    w = Watcher(src, out, "photos", tiny_model, options, ingest_fn=flaky)
    thread = threading.Thread(target=w.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: w.idle and "a.png" in states(out), "the first pass")
        _photo(src / "b.png", 1)  # its pass fails once, the retry ingests it
        wait_for(lambda: "b.png" in states(out), "the retried pass")
        assert w.counters.values["errors"] == 1 and thread.is_alive()
    finally:
        w.request_stop()
        thread.join(DEADLINE_S)


def test_status_of_a_killed_watcher_goes_stale(tmp_path):
    from clipsearch.watch_status import write_watch_status

    path = tmp_path / "watch.json"
    now = time.time()
    write_watch_status(path, {"state": "watching", "heartbeat_unix": now, "heartbeat_every_s": 10.0})
    assert read_watch_status(path, now=now + 5)["state"] == "watching"
    assert read_watch_status(path, now=now + 31) is None  # no heartbeat for 3 beats / 30 s: gone (kill -9)
    write_watch_status(path, {"state": "stopped", "heartbeat_unix": now, "heartbeat_every_s": 10.0})
    assert read_watch_status(path, now=now) is None
    path.write_text("{not json")
    assert read_watch_status(path) is None and read_watch_status(tmp_path / "none.json") is None
