"""The FAISS + SQLite store as a live, durable collection (no service in sight).

- writes are applied incrementally (append, tombstones), and every live item finds itself at rank 1
  through exact search, HNSW + delta, and after a compaction swap;
- start-up loads the snapshot and replays the changes committed after it (deletions included);
- compaction running beside a stream of writes loses none of them;
- a writer process killed with SIGKILL at random moments (between and inside commits and
  compactions) loses no acknowledged write and leaves a catalog the next open accepts;
- other processes' commits are picked up by `refresh()`, including a catalog made afresh;
- a read-only folder with commits left in the -wal is never read stale.
"""

from __future__ import annotations

import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from clipsearch.artifacts import ArtifactLayout
from clipsearch.manifest import ArtifactError
from clipsearch.store import Catalog, FaissStore, NewItem
from clipsearch.store import catalog as catalog_module

DIM = 16
MODEL = {"model": "random-vectors", "embed_dim": DIM}
ROOT = Path(__file__).resolve().parents[1]


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def new_collection(root: Path, name: str = "c"):
    layout = ArtifactLayout(root).collection(name)
    with Catalog(layout.catalog) as cat:
        cat.set_model(MODEL, DIM)
    return layout


def items(prefix: str, vecs: np.ndarray, caption_vecs: np.ndarray | None = None) -> list[NewItem]:
    out = []
    for i, v in enumerate(vecs):
        caps = (f"{prefix}{i} caption",) if caption_vecs is not None else ()
        out.append(NewItem(f"{prefix}{i}", f"/x/{prefix}{i}.png", v, captions=caps,
                           caption_vectors=caption_vecs[i:i + 1] if caption_vecs is not None else None,
                           metadata={"group": i % 3}))
    return out


def check(store: FaissStore, live: dict[str, np.ndarray], gone: set[str]) -> None:
    """Every live item is its own nearest neighbour; no gone one is ever returned or fetched."""
    assert store.count() == len(live)
    assert set(store.ids()) == set(live)
    for image_id, vec in live.items():
        hits = store.search(vec, 3)
        assert hits[0].image_id == image_id, (image_id, hits)
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    for image_id in gone:
        assert store.get(image_id) is None and store.vector(image_id) is None
    probe = next(iter(live.values()))
    assert not gone & {h.image_id for h in store.search(probe, len(live) + len(gone))}


@pytest.mark.parametrize("exact_max", [10_000, 8], ids=["exact", "hnsw"])
def test_incremental_writes_compaction_and_replay(tmp_path, exact_max):
    rng = np.random.default_rng(0)
    layout = new_collection(tmp_path)
    store = FaissStore.open(layout, readonly=False, exact_max=exact_max)
    a = unit(rng, 40)
    store.add(items("a", a, unit(rng, 40)))
    live = {f"a{i}": a[i] for i in range(40)}
    gone: set[str] = set()
    kind = "hnsw" if exact_max < 40 else "exact"
    assert store.describe()["index"]["images"] == kind

    def churn(tag: str) -> None:
        b = unit(rng, 10)
        store.add(items(tag, b))
        live.update({f"{tag}{i}": b[i] for i in range(10)})
        victims = sorted(live)[::7][:4]
        assert store.delete(victims) == len(victims)
        for v in victims:
            live.pop(v)
            gone.add(v)
        moved = sorted(live)[1]  # an upsert with a new vector: the old position becomes a tombstone
        live[moved] = unit(rng, 1)[0]
        store.add([NewItem(moved, "/x/moved.png", live[moved])])

    churn("b")
    stats = store.stats()
    assert stats["images"]["tombstones"] == 5
    assert stats["images"]["delta"] == (11 if kind == "hnsw" else 0)
    check(store, live, gone)
    assert store.search(live["a2"], 5, filter={"group": 2})[0].image_id == "a2"

    out = store.compact()
    assert out["compacted"] and out["images"] == len(live)
    stats = store.stats()
    assert stats["images"]["tombstones"] == 0 and stats["images"]["delta"] == 0
    check(store, live, gone)
    assert (layout.index_dir / "images.hnsw.json").is_file() == (kind == "hnsw")

    churn("c")  # after the snapshot: replayed at the next start
    store.replace_captions("a3", ["new words"], unit(rng, 1))
    store.close()

    reopened = FaissStore.open(layout, readonly=False, exact_max=exact_max)
    check(reopened, live, gone)
    assert reopened.get("a3").captions == ("new words",)
    hits = reopened.search(reopened.vector("a5"), 50, target="captions")
    assert "a3#0" in {h.caption_id for h in hits} and all(h.caption != "a3 caption" for h in hits)
    stats = reopened.stats()
    if kind == "hnsw":
        # the graph came from the snapshot (no rebuild), the 11 writes and 4 deletions after it replayed
        assert stats["replayed_at_start"] > 0 and stats["images"]["delta"] > 0
        assert stats["images"]["tombstones"] > 0
    reopened.close()


def test_compaction_beside_a_stream_of_writes_loses_nothing(tmp_path):
    rng = np.random.default_rng(1)
    layout = new_collection(tmp_path)
    store = FaissStore.open(layout, readonly=False, exact_max=16)
    base = unit(rng, 300)
    store.add(items("a", base))
    live = {f"a{i}": base[i] for i in range(300)}
    gone: set[str] = set()
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            i = 0
            while not stop.is_set() or i < 40:
                v = unit(rng, 1)
                store.add([NewItem(f"w{i}", "/x", v[0])])
                live[f"w{i}"] = v[0]
                if i % 3 == 0:
                    victim = f"a{i}"
                    store.delete([victim])
                    live.pop(victim)
                    gone.add(victim)
                i += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    for _ in range(3):
        assert store.compact()["compacted"]
    stop.set()
    t.join(30)
    assert not errors
    check(store, live, gone)
    store.compact()
    assert store.stats()["images"]["tombstones"] == 0
    check(store, live, gone)


WRITER = textwrap.dedent("""
    import sys, numpy as np
    sys.path.insert(0, sys.argv[1])
    from clipsearch.artifacts import ArtifactLayout
    from clipsearch.store import FaissStore, NewItem
    layout = ArtifactLayout(sys.argv[2]).collection("c")
    store = FaissStore.open(layout, readonly=False, exact_max=8)
    rng = np.random.default_rng(int(sys.argv[3]))
    start = int(sys.argv[4])
    for i in range(start, start + 100000):
        v = rng.standard_normal(16).astype(np.float32)
        v /= np.linalg.norm(v)
        store.add([NewItem(f"k{i}", "/x", v)])
        print(f"ADD k{i} " + v.tobytes().hex(), flush=True)  # acknowledged: the commit returned
        if i % 5 == 4:
            victim = f"k{i - 2}"
            print(f"DELETING {victim}", flush=True)
            store.delete([victim])
            print(f"DEL {victim}", flush=True)
        if i % 7 == 6:
            store.compact()
            print("COMPACTED", flush=True)
""")


def test_sigkill_at_random_moments_loses_no_acknowledged_write(tmp_path):
    layout = new_collection(tmp_path)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(4)
    live: dict[str, np.ndarray] = {}
    gone: set[str] = set()
    start = 0
    compactions = 0
    for round_ in range(4):
        proc = subprocess.Popen([sys.executable, str(script), str(ROOT), str(tmp_path), str(round_), str(start)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout))  # type: ignore[arg-type]
        reader.start()
        deadline = time.monotonic() + 30
        while len(lines) < 20 + round_ * 7:  # let it get going, then kill it at a random moment
            assert proc.poll() is None, proc.stderr.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        reader.join(10)
        for line in lines:
            if not line.endswith("\n"):
                continue  # cut off by the kill: not an acknowledgement
            kind, *rest = line.split()
            if kind == "ADD":
                live[rest[0]] = np.frombuffer(bytes.fromhex(rest[1]), np.float32)
                gone.discard(rest[0])
                start = max(start, int(rest[0][1:]) + 1)
            elif kind == "DELETING":  # from here on it may be gone (acknowledged or not)
                live.pop(rest[0], None)
            elif kind == "DEL":
                gone.add(rest[0])
            else:
                compactions += 1
        # the writes the kill cut off may or may not have committed; the next round starts past them
        start += 10
        store = FaissStore.open(layout, readonly=False, exact_max=8)  # start-up succeeds...
        got = set(store.ids())
        assert set(live) <= got, sorted(set(live) - got)  # ...with every acknowledged write
        assert not gone & got
        for image_id, vec in live.items():
            assert store.search(vec, 1)[0].image_id == image_id
        store.close()
    assert compactions >= 1 and len(live) > 50


def test_refresh_picks_up_other_processes(tmp_path):
    rng = np.random.default_rng(2)
    layout = new_collection(tmp_path)
    writer = FaissStore.open(layout, readonly=False)
    a = unit(rng, 5)
    writer.add(items("a", a))
    reader = FaissStore.open(layout, readonly=True)
    assert reader.count() == 5 and reader.refresh() is False
    v0 = reader.version
    b = unit(rng, 2)
    writer.add(items("b", b))
    writer.delete(["a0"])
    assert reader.refresh() is True and reader.version != v0
    assert reader.count() == 6 and reader.get("a0") is None and reader.search(b[1], 1)[0].image_id == "b1"
    rows, _ = writer.catalog.caption_vectors()
    writer.catalog.set_caption_offsets(rows, np.zeros(len(rows), np.float32), None)  # needs a full rebuild
    assert reader.refresh() is True and reader.stats()["full_rebuilds"] == 1
    writer.close()
    # the catalog made afresh (ingest --force): the reader reopens the new file
    for suffix in ("", "-wal", "-shm"):
        Path(str(layout.catalog) + suffix).unlink(missing_ok=True)
    layout2 = new_collection(tmp_path)
    fresh = FaissStore.open(layout2, readonly=False)
    fresh.add(items("z", unit(rng, 3)))
    fresh.close()
    assert reader.refresh() is True and sorted(reader.ids()) == ["z0", "z1", "z2"]
    reader.close()


def test_catalog_logs_deletions_with_their_seq(tmp_path):
    rng = np.random.default_rng(3)
    with Catalog(tmp_path / "c.sqlite") as cat:
        cat.set_model(MODEL, DIM)
        cat.put(items("a", unit(rng, 3)))
        seq = cat.seq
        cat.delete(["a1", "missing"])
        cat.put(items("b", unit(rng, 1)))
        ch = cat.changes_since(seq)
        assert ch.deleted == ["a1"] and ch.rows.image_ids == ["b0"] and ch.seq == seq + 2
        assert cat.changes_since(ch.seq).rows.image_ids == [] and cat.changes_since(ch.seq).deleted == []


def test_read_only_folder_with_commits_in_the_wal_is_never_read_stale(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    src = tmp_path / "src"
    cat = Catalog(src / "c.sqlite")
    cat.set_model(MODEL, DIM)
    cat.put(items("a", unit(rng, 2)))
    held = sqlite3.connect(src / "c.sqlite")  # a reader holding a snapshot keeps the WAL from folding in
    held.execute("BEGIN")
    held.execute("SELECT COUNT(*) FROM items").fetchone()
    cat.put(items("b", unit(rng, 1)))
    wal = src / "c.sqlite-wal"
    assert wal.stat().st_size > 0
    ro = tmp_path / "ro"
    ro.mkdir()
    for name in ("c.sqlite", "c.sqlite-wal"):
        shutil.copy(src / name, ro / name)
    held.rollback()
    held.close()
    cat.close()
    monkeypatch.setattr(catalog_module, "_writable", lambda folder: False)
    try:
        reader = Catalog(ro / "c.sqlite", readonly=True)
    except ArtifactError as exc:
        assert "write-ahead log" in str(exc)
    else:  # where SQLite could read the WAL, it holds every commit
        assert reader.count()[0] == 3
        reader.close()
