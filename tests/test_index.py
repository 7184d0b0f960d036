import numpy as np
import pytest

from clipsearch.index import IndexParams, VectorIndex, recall_vs_exact
from clipsearch.manifest import ArtifactError


def _unit(rng, n, d=32):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_is_exact_and_hnsw_close():
    rng = np.random.default_rng(0)
    base, queries = _unit(rng, 2000), _unit(rng, 50)
    flat = VectorIndex.build(base, IndexParams(kind="flat"))
    hnsw = VectorIndex.build(base, IndexParams(m=16, ef_construction=200, ef_search=256))
    scores, ids = flat.search(queries, 10)
    ref = np.argsort(-(queries @ base.T), axis=1)[:, :10]
    assert (ids == ref).all()
    np.testing.assert_allclose(scores[:, 0], (queries @ base.T).max(1), rtol=1e-5)
    _, hids = hnsw.search(queries, 10)
    assert recall_vs_exact(hids, ids) > 0.95


def test_k_is_clamped_and_dims_checked():
    rng = np.random.default_rng(1)
    idx = VectorIndex.build(_unit(rng, 5), IndexParams())
    _, ids = idx.search(_unit(rng, 2), 50)
    assert ids.shape == (2, 5)
    with pytest.raises(ValueError):
        idx.search(np.zeros((1, 7), np.float32), 3)
    with pytest.raises(ValueError):
        IndexParams(kind="ivf")


def test_save_load_roundtrip_and_manifest(tmp_path):
    rng = np.random.default_rng(2)
    base = _unit(rng, 100)
    idx = VectorIndex.build(base, IndexParams(), model={"model": "x"}, split="test")
    mpath = idx.save(tmp_path, "images.hnsw")
    loaded = VectorIndex.load(mpath)
    assert loaded.ntotal == 100 and loaded.dim == 32
    assert loaded.manifest["model"] == {"model": "x"} and loaded.manifest["metric"] == "inner_product"
    assert loaded.manifest["params"] == {"kind": "hnsw", "m": 16, "ef_construction": 200, "ef_search": 100}
    q = _unit(rng, 3)
    assert (loaded.search(q, 5)[1] == idx.search(q, 5)[1]).all()


def test_rebuild_replaces_old_file_and_leaves_one(tmp_path):
    rng = np.random.default_rng(3)
    VectorIndex.build(_unit(rng, 10), IndexParams()).save(tmp_path, "a")
    VectorIndex.build(_unit(rng, 20), IndexParams()).save(tmp_path, "a")
    assert len(list(tmp_path.glob("a.*.faiss"))) == 1
    assert VectorIndex.load(tmp_path / "a.json").ntotal == 20
    assert not list(tmp_path.glob(".*tmp"))


def test_corrupt_or_missing_index_is_a_clear_error(tmp_path):
    rng = np.random.default_rng(4)
    mpath = VectorIndex.build(_unit(rng, 10), IndexParams()).save(tmp_path, "a")
    faiss_file = next(tmp_path.glob("a.*.faiss"))
    faiss_file.write_bytes(faiss_file.read_bytes()[:50])
    with pytest.raises(ArtifactError, match="does not match"):
        VectorIndex.load(mpath)
    with pytest.raises(ArtifactError, match="cannot read|corrupt"):
        VectorIndex.load(mpath, verify=False)
    faiss_file.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        VectorIndex.load(mpath)
    mpath.write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt JSON"):
        VectorIndex.load(mpath)
    with pytest.raises(ArtifactError, match="missing file"):
        VectorIndex.load(tmp_path / "nope.json")


def test_recall_vs_exact_counts_overlap():
    exact = np.array([[1, 2, 3, 4]])
    assert recall_vs_exact(np.array([[4, 3, 9, -1]]), exact) == 0.5
