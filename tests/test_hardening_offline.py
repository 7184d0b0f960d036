"""Faults in the offline pipeline: a SIGKILLed `python -m offline index` leaves the previous index
whole and servable, and an interrupted stage resumes without redoing finished work.

The kills are real SIGKILLs of a real `python -m offline index` process, delivered by the process
itself at exact points (before each atomic rename of a rebuild, and half-way through writing a FAISS
file), so every window between two commits is hit deterministically instead of by chance.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clipsearch.index import VectorIndex
from offline.cli import main

REPO = Path(__file__).resolve().parents[1]
NAMES = ("images.hnsw", "images.flat", "texts.hnsw", "texts.flat")

# Runs `python -m offline ARGS...` with os.replace (every atomic commit) or faiss.write_index
# patched to SIGKILL the process: argv[1] = "replace:N" (die instead of the N-th rename) or
# "write:N" (die after writing half of the N-th FAISS file).
KILLER = r"""
import os, runpy, signal, sys
mode, n = sys.argv[1].split(":"); n = int(n); calls = [0]
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "replace":
    real = os.replace
    def replace(src, dst, *a, **k):
        calls[0] += 1
        if calls[0] == n:
            die()
        return real(src, dst, *a, **k)
    os.replace = replace
elif mode == "write":
    import faiss
    real = faiss.write_index
    def write_index(index, path):
        real(index, path)
        calls[0] += 1
        if calls[0] == n:
            with open(path, "r+b") as fh:
                fh.truncate(os.path.getsize(path) // 2)
            die()
    faiss.write_index = write_index
elif mode == "texts":
    import offline.embed
    def embed_texts(*a, **k):
        die()
    offline.embed.embed_texts = embed_texts
sys.argv = ["offline", *sys.argv[2:]]
runpy.run_module("offline", run_name="__main__", alter_sys=True)
"""


def run_killed(how: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", KILLER, how, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _common(out: Path) -> list[str]:
    return ["--out", str(out), "--threads", "1"]


def _embed_args(out: Path, ckpt: Path) -> list[str]:
    return ["embed", *_common(out), "--model", "test-tiny-vit", "--pretrained", str(ckpt),
            "--workers", "0", "--batch-size", "4"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_dataset) -> Path:
    out = tmp_path_factory.mktemp("hardening") / "art"
    assert main(["prepare", "--data", str(tiny_dataset), "--split", "random", "--ratios", "0.5,0.25,0.25",
                 "--seed", "1", *_common(out)]) == 0
    return out


@pytest.fixture(scope="module")
def indexed(prepared, tiny_checkpoint, tmp_path_factory) -> Path:
    """Artifacts with embeddings and the first (M=16) indexes of split test."""
    out = Path(shutil.copytree(prepared, tmp_path_factory.mktemp("indexed") / "art"))
    assert main(_embed_args(out, tiny_checkpoint)) == 0
    assert main(["index", *_common(out), "--no-sweep"]) == 0
    return out


def _snapshot(idir: Path) -> dict[str, dict]:
    return {name: json.loads((idir / f"{name}.json").read_text()) for name in NAMES}


def _assert_servable(out: Path, tmp_path: Path) -> None:
    """Every index loads, checks out and searches, and the evaluation accepts the set."""
    idir = out / "indexes" / "test"
    for name in NAMES:
        index = VectorIndex.load(idir / f"{name}.json", verify=True)
        assert index.ntotal > 0
        _, ids = index.search(np.eye(1, index.dim, dtype=np.float32), 3)
        assert (ids >= 0).all()
    assert main(["evaluate", "--out", str(out), "--eval-split", "test"]) == 0


# kill point -> the manifests the killed run had committed (renames 1-3 are images.hnsw's staging
# file, content-named file and manifest; 4-6 the same for texts.hnsw)
KILL_POINTS = {"replace:1": set(), "replace:2": set(), "replace:3": set(),
               "replace:4": {"images.hnsw"}, "replace:5": {"images.hnsw"}, "replace:6": {"images.hnsw"},
               "write:1": set(), "write:2": {"images.hnsw"}}


@pytest.mark.parametrize("how", KILL_POINTS)
def test_sigkill_mid_index_leaves_previous_index_servable_and_rerun_resumes(indexed, tmp_path, how):
    out = Path(shutil.copytree(indexed, tmp_path / "art"))
    idir = out / "indexes" / "test"
    before = _snapshot(idir)
    # rebuilding the HNSW indexes with another M rewrites images.hnsw and texts.hnsw (3 renames
    # each: staging file, content-named file, manifest); the flat ones are up to date and reused
    proc = run_killed(how, "index", *_common(out), "--no-sweep", "--m", "8")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    after = _snapshot(idir)
    committed = {name for name in NAMES if after[name] != before[name]}
    # a manifest is either the old one or the new one, and whichever it is, its file is whole
    assert committed == KILL_POINTS[how]
    for name in committed:
        assert after[name]["params"]["m"] == 8
    _assert_servable(out, tmp_path)

    # the rerun finishes the job, reusing what the killed run had committed
    t0 = time.perf_counter()
    assert main(["index", *_common(out), "--no-sweep", "--m", "8"]) == 0
    final = _snapshot(idir)
    assert all(final[name]["params"]["m"] == 8 for name in ("images.hnsw", "texts.hnsw"))
    for name in committed:
        assert final[name] == after[name], f"{name} was rebuilt although it had been committed"
    for name in ("images.flat", "texts.flat"):
        assert final[name] == before[name]
    # no half-written leftovers, one index file per name
    leftovers = sorted(p.name for p in idir.iterdir() if p.name.startswith("."))
    assert leftovers == [], leftovers
    for name in NAMES:
        assert len(list(idir.glob(f"{name}.*.faiss"))) == 1
    _assert_servable(out, tmp_path)
    assert time.perf_counter() - t0 < 60


def test_app_serves_a_collection_whose_ingest_was_killed(tiny_dataset, tiny_checkpoint, tmp_path):
    """SIGKILL at ingest's last atomic rename (its report, after the catalog commits): the service
    serves every committed item, and the rerun finds nothing left to embed."""
    from fastapi.testclient import TestClient

    from app.config import Settings
    from app.main import create_app

    out = tmp_path / "art"
    argv = ["ingest", str(tiny_dataset), "--out", str(out), "--collection", "tiny", "--model", "test-tiny-vit",
            "--pretrained", str(tiny_checkpoint), "--workers", "0", "--batch-size", "4", "--threads", "1",
            "--image-backend", "torch", "--text-backend", "torch"]
    proc = run_killed("replace:1", *argv)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / "collections" / "tiny" / "report.json").exists()
    settings = Settings(artifacts_dir=out, device="cpu", torch_threads=1, text_backend="torch",
                        image_backend="torch")
    with TestClient(create_app(settings), client=("127.0.0.1", 50000)) as client:  # loopback: no key needed
        deadline = time.monotonic() + 60
        while (r := client.get("/readyz")).status_code != 200:
            assert r.json()["reason"].startswith("loading"), r.json()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert r.json()["collections"]["tiny"] == {"images": 12, "captions": 36}
        hits = client.post("/search/text", json={"query": "a red circle", "k": 3})
        assert hits.status_code == 200 and len(hits.json()["results"]) == 3
    assert main(argv) == 0
    report = json.loads((out / "collections" / "tiny" / "report.json").read_text())
    assert report["changes"]["unchanged"] == 12 and report["changes"]["new"] == 0


def _spy(monkeypatch, module, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(module, name)

    def wrapper(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(module, name, wrapper)
    return calls


@pytest.mark.parametrize("interruption", ["ctrl-c", "sigkill"])
def test_embed_resumes_after_interruption_without_redoing_images(prepared, tiny_checkpoint, tmp_path,
                                                                 monkeypatch, interruption):
    import offline.embed as embed_mod

    out = Path(shutil.copytree(prepared, tmp_path / "art"))
    edir = out / "embeddings" / "test"
    if interruption == "ctrl-c":
        def interrupted(*a, **k):
            raise KeyboardInterrupt

        with monkeypatch.context() as m:
            m.setattr(embed_mod, "embed_texts", interrupted)
            assert main(_embed_args(out, tiny_checkpoint)) == 130
    else:
        proc = run_killed("texts:0", *_embed_args(out, tiny_checkpoint))
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # the images part was committed before the caption part started
    manifest = json.loads((edir / "manifest.json").read_text())
    assert set(manifest["parts"]) == {"images"} and not (edir / "texts.npy").exists()
    images_mtime = (edir / "images.npy").stat().st_mtime_ns
    images = np.load(edir / "images.npy")

    image_calls = _spy(monkeypatch, embed_mod, "embed_images")
    text_calls = _spy(monkeypatch, embed_mod, "embed_texts")
    assert main(_embed_args(out, tiny_checkpoint)) == 0
    assert image_calls == [] and text_calls == [1]
    assert (edir / "images.npy").stat().st_mtime_ns == images_mtime
    np.testing.assert_array_equal(np.load(edir / "images.npy"), images)
    manifest = json.loads((edir / "manifest.json").read_text())
    assert set(manifest["parts"]) == {"images", "texts"}
    assert manifest["counts"]["texts"] == len(np.load(edir / "texts.npy"))
    # the index stage accepts the resumed embeddings
    assert main(["index", *_common(out), "--no-sweep"]) == 0
    _assert_servable(out, tmp_path)
