"""Settings from the environment, and an import of app.main that loads nothing."""

from __future__ import annotations

import importlib
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from clipsearch.store import EXACT_MAX

from app.config import Settings

ENV_NAMES = ["ARTIFACTS_DIR", "CLIPSEARCH_ARTIFACTS_DIR", "CLIPSEARCH_COLLECTIONS",
             "CLIPSEARCH_DEFAULT_COLLECTION", "CLIPSEARCH_MAX_OFFSET", "CLIPSEARCH_THUMBNAIL_PX",
             "CLIPSEARCH_EXACT_MAX", "CLIPSEARCH_MAX_K", "CLIPSEARCH_DEFAULT_K", "CLIPSEARCH_CORS_ORIGINS",
             "CLIPSEARCH_MAX_UPLOAD_BYTES", "CLIPSEARCH_TORCH_THREADS", "CLIPSEARCH_INFERENCE_THREADS"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


def test_defaults():
    s = Settings()
    assert s.artifacts_dir == Path("artifacts")
    assert s.collections == [] and s.default_collection is None  # every collection found, first is default
    assert (s.default_k, s.max_k, s.max_query_chars) == (10, 100, 1000)
    assert s.max_upload_bytes == 10 * 1024 * 1024 and s.cors_origins == []
    assert (s.max_offset, s.thumbnail_px, s.exact_max) == (10_000, 256, EXACT_MAX)
    assert s.torch_threads >= 1
    assert not hasattr(s, "serve_split")


def test_env_names(monkeypatch, tmp_path):
    monkeypatch.setenv("ARTIFACTS_DIR", str(tmp_path))
    monkeypatch.setenv("CLIPSEARCH_COLLECTIONS", " photos, flickr8k-test ,")
    monkeypatch.setenv("CLIPSEARCH_DEFAULT_COLLECTION", "flickr8k-test")
    monkeypatch.setenv("CLIPSEARCH_MAX_OFFSET", "500")
    monkeypatch.setenv("CLIPSEARCH_THUMBNAIL_PX", "128")
    monkeypatch.setenv("CLIPSEARCH_EXACT_MAX", "4")
    monkeypatch.setenv("CLIPSEARCH_MAX_K", "50")
    monkeypatch.setenv("CLIPSEARCH_CORS_ORIGINS", "http://a.example, http://b.example")
    monkeypatch.setenv("CLIPSEARCH_MAX_UPLOAD_BYTES", "2048")
    monkeypatch.setenv("CLIPSEARCH_INFERENCE_THREADS", "3")
    monkeypatch.setenv("CLIPSEARCH_TORCH_THREADS", "2")
    s = Settings()
    assert s.artifacts_dir == tmp_path and s.max_k == 50
    assert s.collections == ["photos", "flickr8k-test"] and s.default_collection == "flickr8k-test"
    assert (s.max_offset, s.thumbnail_px, s.exact_max) == (500, 128, 4)
    assert s.cors_origins == ["http://a.example", "http://b.example"]
    assert (s.max_upload_bytes, s.inference_threads, s.torch_threads) == (2048, 3, 2)
    monkeypatch.setenv("CLIPSEARCH_ARTIFACTS_DIR", "/prefixed")
    assert Settings().artifacts_dir == Path("/prefixed")  # the prefixed name wins


@pytest.mark.parametrize("env", [{"CLIPSEARCH_MAX_K": "lots"}, {"CLIPSEARCH_MAX_K": "0"},
                                 {"CLIPSEARCH_DEFAULT_K": "20", "CLIPSEARCH_MAX_K": "10"},
                                 {"CLIPSEARCH_COLLECTIONS": "../etc"}, {"CLIPSEARCH_COLLECTIONS": "a,b/c"},
                                 {"CLIPSEARCH_COLLECTIONS": ".hidden"}, {"CLIPSEARCH_COLLECTIONS": "a,a"},
                                 {"CLIPSEARCH_DEFAULT_COLLECTION": "../etc"},
                                 {"CLIPSEARCH_COLLECTIONS": "a,b", "CLIPSEARCH_DEFAULT_COLLECTION": "c"},
                                 {"CLIPSEARCH_MAX_OFFSET": "-1"}, {"CLIPSEARCH_THUMBNAIL_PX": "4096"},
                                 {"CLIPSEARCH_EXACT_MAX": "-1"}])
def test_bad_values_fail_fast(monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_empty_default_collection_means_unset(monkeypatch):
    monkeypatch.setenv("CLIPSEARCH_DEFAULT_COLLECTION", "")  # what compose's ${VAR:-} passes
    assert Settings().default_collection is None


def test_import_loads_nothing():
    before = {t.name for t in threading.enumerate()}
    main = importlib.import_module("app.main")
    state = main.app.state.service
    assert state.resources is None and state.reason.startswith("loading")
    assert {t.name for t in threading.enumerate()} - before == set()
