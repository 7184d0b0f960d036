"""A catalog written before `items.offset` existed: read-only opens read its image offsets as 0; the
first writable open adds the column (ALTER TABLE ... ADD COLUMN) and keeps every row and seq."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from clipsearch.artifacts import ArtifactLayout
from clipsearch.store import Catalog, FaissStore, NewItem
from clipsearch.store import catalog as catalog_module

DIM = 4
MODEL = {"model": "fake-old", "embed_dim": DIM}


def _old_catalog(path) -> np.ndarray:
    """A catalog file in the schema of the previous version (no items.offset), with three items."""
    schema = catalog_module._SCHEMA.replace(  # noqa: SLF001 - the old schema is the new one less a column
        "    vector BLOB NOT NULL,\n    offset REAL NOT NULL DEFAULT 0,\n    seq INTEGER NOT NULL\n);\n"
        "CREATE TABLE IF NOT EXISTS captions", "    vector BLOB NOT NULL,\n    seq INTEGER NOT NULL\n);\n"
        "CREATE TABLE IF NOT EXISTS captions")
    assert schema != catalog_module._SCHEMA  # noqa: SLF001
    vecs = np.eye(3, DIM, dtype=np.float32)
    conn = sqlite3.connect(path)
    conn.executescript(schema)
    conn.executemany("INSERT INTO meta VALUES (?, ?)", [("format", "1"), ("seq", "1"), ("uid", "old"),
                                                        ("model", '{"embed_dim": 4, "model": "fake-old"}'),
                                                        ("dim", str(DIM))])
    conn.executemany("INSERT INTO items (image_id, path, metadata, text_sha256, vector, seq) "
                     "VALUES (?, ?, '{}', ?, ?, 1)",
                     [(f"i{k}", f"/i{k}.png", catalog_module.captions_sha256(["c"]), vecs[k].tobytes())
                      for k in range(3)])
    conn.executemany("INSERT INTO captions (caption_id, image_id, ord, caption, vector, offset, seq) "
                     "VALUES (?, ?, 0, 'c', ?, ?, 1)",
                     [(f"i{k}#0", f"i{k}", vecs[k].tobytes(), 0.1 * k) for k in range(3)])
    conn.commit()
    conn.close()
    return vecs


def _columns(path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {r[1] for r in conn.execute("PRAGMA table_info(items)")}
    finally:
        conn.close()


@pytest.fixture
def old(tmp_path):
    layout = ArtifactLayout(tmp_path / "artifacts").collection("old")
    layout.catalog.parent.mkdir(parents=True)
    vecs = _old_catalog(layout.catalog)
    assert "offset" not in _columns(layout.catalog)
    return layout, vecs


def test_read_only_open_of_an_old_catalog_reads_offsets_as_zero(old):
    layout, vecs = old
    with Catalog(layout.catalog, readonly=True) as cat:
        rows = cat.rows()
        np.testing.assert_array_equal(rows.image_offsets, np.zeros(3, np.float32))
        np.testing.assert_allclose(rows.caption_offsets, [0.0, 0.1, 0.2], atol=1e-6)
        np.testing.assert_array_equal(cat.changes_since(0).rows.image_offsets, np.zeros(3, np.float32))
        assert cat.hubness_images() is None
    assert "offset" not in _columns(layout.catalog)  # a reader changes nothing
    store = FaissStore.open(layout, readonly=True)
    try:
        hits = store.search(vecs[1], 3)
        assert hits[0].image_id == "i1" and [h.score for h in hits] == [h.cosine for h in hits]
        assert store.describe()["hubness_images"] is None
    finally:
        store.close()


def test_writable_open_adds_the_column_and_keeps_everything(old):
    layout, vecs = old
    with Catalog(layout.catalog) as cat:
        assert "offset" in _columns(layout.catalog)
        assert cat.seq == 1 and cat.get_meta("uid") == "old"  # not a commit: derived snapshots stay valid
        assert cat.rows().image_ids == ["i0", "i1", "i2"]
        rows, got = cat.image_vectors()
        np.testing.assert_array_equal(got, vecs)
        cat.set_image_offsets(rows[:1], np.array([0.5], np.float32), {"beta": 0.5})
        cat.put([NewItem("i3", "/i3.png", vecs[0], offset=-0.25)])
        np.testing.assert_allclose(cat.rows().image_offsets, [0.5, 0.0, 0.0, -0.25])
        assert cat.hubness_images() == {"beta": 0.5}
    with Catalog(layout.catalog) as cat:  # a second writable open finds the column there
        np.testing.assert_allclose(cat.rows().image_offsets, [0.5, 0.0, 0.0, -0.25])


def test_a_reader_sees_the_column_a_writer_added_after_it_opened(old):
    layout, vecs = old
    reader = FaissStore.open(layout, readonly=True)
    try:
        assert reader.search(vecs[2], 1)[0].image_id == "i2"
        with Catalog(layout.catalog) as cat:
            rows, _ = cat.image_vectors()
            cat.set_image_offsets(rows, np.array([0.0, 0.0, -2.0], np.float32), {"beta": 1.0})
        assert reader.refresh()
        top = reader.search(vecs[2], 3)
        assert top[-1].image_id == "i2"
        assert (top[-1].score, top[-1].cosine) == (pytest.approx(-1.0), pytest.approx(1.0))
    finally:
        reader.close()
