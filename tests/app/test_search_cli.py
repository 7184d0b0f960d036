"""`clipsearch search`: answers in the terminal from a collection, without a server. Here, beside the
service tests, for their fixtures: the fake colour encoder's collection and the real tiny model's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from offline import console


@pytest.fixture
def color_collection(tmp_path, fakes, dataset):
    """The service tests' dataset as an on-disk collection, embedded with the fake colour encoder."""
    from clipsearch.artifacts import ArtifactLayout
    from clipsearch.store import Catalog

    store = fakes.fake_store(dataset)  # the fake vectors, exactly as the API tests have them
    root = tmp_path / "art"
    with Catalog(ArtifactLayout(root).collection("colors").catalog) as catalog:
        catalog.set_model(fakes.FAKE_MODEL, fakes.ColorEncoder.dim)
        catalog.put([_as_new(store, i) for i in store.ids()])
    return root


def _as_new(store, image_id):
    from clipsearch.store import NewItem

    item = store.get(image_id)
    return NewItem(image_id, item.path, store.vector(image_id), metadata=dict(item.metadata))


def test_search_prints_rank_path_score(color_collection, fakes, capsys):
    from offline import search_cli

    args = console.build_parser().parse_args(["search", "something red", "-k", "3", "--out", str(color_collection)])
    assert search_cli.run(args, encoder=fakes.ColorEncoder()) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    rank, path, score = lines[0].split()
    assert rank == "1" and path.endswith("_solid_red.png") and Path(path).is_file()
    scores = [float(line.split()[2]) for line in lines]
    assert scores == sorted(scores, reverse=True)


def test_search_json_and_collection_choice(color_collection, fakes, capsys, monkeypatch):
    from offline import search_cli

    monkeypatch.delenv("CLIPSEARCH_DEFAULT_COLLECTION", raising=False)
    args = console.build_parser().parse_args(["search", "blue", "--json", "-k", "2", "--collection", "colors",
                                              "--out", str(color_collection)])
    assert search_cli.run(args, encoder=fakes.ColorEncoder()) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["collection"] == "colors" and [r["rank"] for r in out["results"]] == [1, 2]
    assert out["results"][0]["image_id"].endswith("_solid_blue.png")
    assert set(out["results"][0]) == {"rank", "image_id", "path", "score", "captions"}

    bad = console.build_parser().parse_args(["search", "blue", "--collection", "nope", "--out", str(color_collection)])
    assert search_cli.run(bad, encoder=fakes.ColorEncoder()) == 2
    assert "no collection 'nope'" in capsys.readouterr().err
    empty = console.build_parser().parse_args(["search", "blue", "--out", str(color_collection.parent / "none")])
    assert search_cli.run(empty) == 2
    assert "clipsearch ingest" in capsys.readouterr().err


def test_search_loads_the_collections_own_model(tmp_path, tiny_checkpoint, fakes, dataset):
    """End to end with the real tiny model the collection names: the CLI's ranking is the store's own
    for that model's text vector."""
    import numpy as np

    from clipsearch.artifacts import ArtifactLayout
    from clipsearch.encoder import ClipEncoder
    from clipsearch.models import load_model
    from clipsearch.store import open_store
    from offline import search_cli

    root = fakes.build_artifacts(tmp_path / "art", dataset, pretrained=str(tiny_checkpoint))
    got = search_cli.search(root, "tiny", "a plain red square", 4)
    store = open_store(ArtifactLayout(root), "tiny")
    vec = ClipEncoder(load_model("test-tiny-vit", str(tiny_checkpoint), "cpu")).encode_texts(["a plain red square"])[0]
    want = [h.image_id for h in store.search(np.asarray(vec, np.float32), 4)]
    assert [r["image_id"] for r in got] == want and len(got) == 4
