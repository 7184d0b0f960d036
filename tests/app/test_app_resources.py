"""Start-up against real on-disk artifacts built with the tiny open_clip model, and every way a
broken artifacts dir keeps the service un-ready with one clear reason."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from clipsearch.manifest import ArtifactError, sha256_file
from clipsearch.models import ModelLoadError, load_model

from app.resources import load_resources


def wait_loaded(client, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        r = client.get("/readyz")
        if r.status_code == 200 or not r.json()["reason"].startswith("loading"):
            return r
        assert time.monotonic() < deadline, "resources never finished loading"
        time.sleep(0.02)


@pytest.fixture
def artifacts(tiny_artifacts: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny artifacts that a test may break."""
    return Path(shutil.copytree(tiny_artifacts, tmp_path / "artifacts"))


def test_load_resources_real_tiny_model(fakes, tiny_artifacts, dataset, tmp_path):
    res = load_resources(fakes.settings_for(tmp_path, artifacts_dir=tiny_artifacts))
    assert res.model["model"] == "test-tiny-vit" and res.model["embed_dim"] == 32
    assert res.image_index.ntotal == len(dataset[0]) and res.text_index.ntotal == len(dataset[1])
    assert res.encoder.dim == 32 and res.split == "test"
    assert res.image_files[dataset[0][0]["image_id"]] == Path(dataset[0][0]["image_path"])
    assert len(res.captions_by_image) == len(dataset[0])


def test_app_serves_real_artifacts(make_client, tiny_artifacts, dataset, fakes, caplog):
    with caplog.at_level("INFO", logger="app"):
        client = make_client(resources=None, artifacts_dir=tiny_artifacts)
        r = wait_loaded(client)
    assert r.status_code == 200, r.text
    assert r.json()["model"]["model"] == "test-tiny-vit"
    assert any(rec.message.startswith("ready: test-tiny-vit") for rec in caplog.records)
    ids = {row["image_id"] for row in dataset[0]}
    hits = client.post("/search/text", json={"query": "a red square", "k": 5}).json()["results"]
    assert len(hits) == 5 and {h["image_id"] for h in hits} <= ids
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert all(-1.0001 <= h["score"] <= 1.0001 for h in hits)
    data = fakes.png_bytes(fakes.image("stripes", "red", "white"))
    caps = client.post("/search/image", files={"file": ("q.png", data, "image/png")},
                       data={"k": "3"}).json()["results"]
    assert len(caps) == 3


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def _set_model(root: Path, **changes) -> None:
    """Rename the model consistently everywhere (embeddings manifest, hash links, both indexes)."""
    emb = root / "embeddings/test/manifest.json"
    _edit_json(emb, lambda m: m["model"].update(changes))
    sha = sha256_file(emb)
    for name in ("images", "texts"):
        _edit_json(root / f"indexes/test/{name}.hnsw.json",
                   lambda m: (m["model"].update(changes), m.update(embeddings_manifest_sha256=sha)))


def _break_faiss(root: Path) -> None:
    path = next((root / "indexes/test").glob("images.hnsw.*.faiss"))
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))


BREAKERS = {
    "missing-index": (lambda r: (r / "indexes/test/images.hnsw.json").unlink(),
                      "missing index manifest indexes/test/images.hnsw.json"),
    "corrupt-manifest": (lambda r: (r / "indexes/test/texts.hnsw.json").write_text('{"model": {'),
                         "index manifest indexes/test/texts.hnsw.json is not valid JSON"),
    "model-mismatch": (lambda r: _edit_json(r / "indexes/test/texts.hnsw.json",
                                            lambda m: m["model"].update(model="ViT-B-32", embed_dim=512)),
                       "were built with different models"),
    "missing-faiss": (lambda r: [p.unlink() for p in (r / "indexes/test").glob("texts.hnsw.*.faiss")],
                      "index file missing"),
    "corrupt-faiss": (_break_faiss, "does not match its manifest"),
    "count-mismatch": (lambda r: _edit_json(r / "embeddings/test/images.json", lambda rows: rows.pop()),
                       "holds 12 vectors but images.json has 11 records"),
    "stale-embeddings": (lambda r: _edit_json(r / "embeddings/test/manifest.json",
                                              lambda m: m.update(rerun=True)),
                         "different embeddings run"),
    "missing-texts-json": (lambda r: (r / "embeddings/test/texts.json").unlink(),
                           "missing embeddings/test/texts.json"),
    "bad-records": (lambda r: (r / "embeddings/test/texts.json").write_text('[{"caption_id": 1}]'),
                    "embeddings/test/texts.json record 0 lacks one of caption_id"),
    "unknown-model": (lambda r: _set_model(r, model="no-such-model"), "Unknown model 'no-such-model'"),
    "model-dim-mismatch": (lambda r: _set_model(r, embed_dim=64), "has dimension 32 but its model"),
    "model-weights-unavailable": (lambda r: _set_model(r, pretrained="openai"),
                                  "Could not get the 'openai' weights for test-tiny-vit"),
    "no-artifacts": (lambda r: shutil.rmtree(r), "does not exist"),
}


@pytest.mark.parametrize("breaker", BREAKERS, ids=list(BREAKERS))
def test_broken_artifacts_keep_app_unready(make_client, artifacts, breaker, caplog):
    breaks, reason = BREAKERS[breaker]
    breaks(artifacts)
    with caplog.at_level("INFO", logger="app"):
        client = make_client(resources=None, artifacts_dir=artifacts)
        r = wait_loaded(client)
    assert r.status_code == 503
    assert r.json()["ready"] is False
    assert reason in r.json()["reason"]
    s = client.post("/search/text", json={"query": "red"})
    assert s.status_code == 503 and reason in s.json()["error"]["message"]
    errors = [rec for rec in caplog.records if rec.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None and "\n" not in errors[0].getMessage()
    assert reason in errors[0].getMessage()


def test_wrong_split_is_named(make_client, tiny_artifacts):
    client = make_client(resources=None, artifacts_dir=tiny_artifacts, serve_split="val")
    r = wait_loaded(client)
    assert r.status_code == 503 and "indexes/val/images.hnsw.json" in r.json()["reason"]


# --- fine-tuned checkpoints: recorded absolute path, relocation under ARTIFACTS_DIR/models, sha ---

@pytest.fixture(scope="module")
def checkpoint_artifacts(tmp_path_factory, dataset, fakes) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("ckpt")
    ckpt = base / "elsewhere" / "tiny-finetuned.pt"
    ckpt.parent.mkdir()
    torch.manual_seed(0)
    torch.save(load_model("test-tiny-vit", None, device="cpu").model.state_dict(), ckpt)
    return fakes.build_artifacts(base / "artifacts", dataset, pretrained=str(ckpt)), ckpt


def test_checkpoint_at_recorded_path(checkpoint_artifacts, fakes, tmp_path):
    root, ckpt = checkpoint_artifacts
    res = load_resources(fakes.settings_for(tmp_path, artifacts_dir=root))
    assert res.model["pretrained"] == str(ckpt.resolve())
    assert res.model["checkpoint_sha256"] == sha256_file(ckpt)


def test_checkpoint_relocated_under_models(checkpoint_artifacts, fakes, tmp_path):
    root, ckpt = checkpoint_artifacts
    copy = Path(shutil.copytree(root, tmp_path / "moved"))
    (copy / "models").mkdir()
    shutil.copy(ckpt, copy / "models" / ckpt.name)
    (copy / "models" / ckpt.name).touch()
    settings = fakes.settings_for(tmp_path, artifacts_dir=copy)
    # the recorded path still exists in this test, so point the manifests at a gone location
    for name in ("images", "texts"):
        _edit_json(copy / f"indexes/test/{name}.hnsw.json",
                   lambda m: m["model"].update(pretrained=f"/gone/{ckpt.name}"))
    _edit_json(copy / "embeddings/test/manifest.json",
               lambda m: m["model"].update(pretrained=f"/gone/{ckpt.name}"))
    sha = sha256_file(copy / "embeddings/test/manifest.json")
    for name in ("images", "texts"):
        _edit_json(copy / f"indexes/test/{name}.hnsw.json", lambda m: m.update(embeddings_manifest_sha256=sha))
    res = load_resources(settings)
    assert res.model["checkpoint_sha256"] == sha256_file(ckpt)

    # different weights under the same name: refused by sha256
    state = torch.load(ckpt, weights_only=True)
    state["logit_scale"] = state["logit_scale"] + 1.0
    torch.save(state, copy / "models" / ckpt.name)
    with pytest.raises(ModelLoadError, match="sha256"):
        load_resources(settings)

    (copy / "models" / ckpt.name).unlink()
    with pytest.raises(ModelLoadError, match="neither at its recorded path"):
        load_resources(settings)


def test_local_checkpoint_without_sha_is_refused(checkpoint_artifacts, fakes, tmp_path):
    root, _ = checkpoint_artifacts
    copy = Path(shutil.copytree(root, tmp_path / "nosha"))
    _set_model(copy, checkpoint_sha256=None)
    with pytest.raises(ArtifactError, match="without its checkpoint_sha256"):
        load_resources(fakes.settings_for(tmp_path, artifacts_dir=copy))
