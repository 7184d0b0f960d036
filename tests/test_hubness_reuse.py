"""The build's hubness banks from the fine-tuning feature cache (issue 34, item 4): the train embeddings
the cached features give through the trained model are written as `offline embed` writes them, so the
hubness stage reuses them; its banks equal, within float tolerance, those of a second full pass."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import offline.finetune as ft
from clipsearch.models import LoadedModel, ModelIdentity
from offline.embed import embed, load_embeddings, save_split_embeddings
from offline.finetune.runner import _save_train_embeddings
from offline.hubness import run_hubness
from tests.test_finetune import write_splits

lit = pytest.importorskip("clipsearch.lit_model")

TORCH = {"image_backend": "torch", "text_backend": "torch", "workers": 0, "batch_size": 16}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from a second thread on a shared machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """Random-tower lit model (no packaged weights: fast), splits of tiny shape images, features of
    train with mirrors, and the backend a feature stage with mirror trains (one image block and one
    text layer unlocked), its ends nudged as training would."""
    out = tmp_path_factory.mktemp("reuse")
    write_splits(out, {"train": 1, "val": 1})
    torch.manual_seed(0)
    model, preprocess_train, preprocess, tokenizer = lit.build_lit_model("cpu", load_towers=False)
    plain = LoadedModel(model, preprocess, preprocess_train, tokenizer,
                        ModelIdentity(lit.LIT_MODEL_NAME, None, None, lit.LIT_EMBED_DIM), torch.device("cpu"))
    splits = {s: ft.read_split_data(out, s) for s in ("train", "val")}
    feats = ft.extract_features(out, plain, splits, image_cut=1, text_cut=1, workers=0, batch_size=8, mirror=True)
    backend = ft.FeatureBackend(model, feats, splits, 1, 1, device=torch.device("cpu"), mirror=True)
    with torch.no_grad():
        for p in (*model.visual.trunk.conv_head.parameters(), *model.visual.head.parameters(),
                  *model.text.proj.parameters(), *model.text.transformer.encoder.layer[-1].parameters()):
            p.add_(0.05 * torch.randn_like(p))
    ckpt = out / "models" / "fake.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), ckpt)
    identity = ModelIdentity(lit.LIT_MODEL_NAME, str(ckpt.resolve()), "f" * 64, lit.LIT_EMBED_DIM, "mirror")
    trained = LoadedModel(model, preprocess, preprocess_train, tokenizer, identity, torch.device("cpu"))
    return out, backend, trained, ckpt


def test_banks_from_the_feature_cache_equal_a_second_pass(fake, tmp_path):
    out, backend, trained, ckpt = fake
    timings = _save_train_embeddings(out, lit.LIT_MODEL_NAME, ckpt, trained.identity.checkpoint_sha256, backend,
                                     "fake")
    assert "train_embeddings" in timings
    second = tmp_path / "second"  # the same splits, no embeddings: the hubness stage embeds train itself
    shutil.copytree(out / "splits", second / "splits")
    reused = embed(out, "train", trained, **TORCH)
    assert reused["reused"] and "images_seconds" not in reused
    run_hubness(out, trained, k=(2,), betas=(0.0, 0.5), embed_kwargs=TORCH)
    fresh = run_hubness(second, trained, k=(2,), betas=(0.0, 0.5), embed_kwargs=TORCH)
    assert fresh["seconds"] >= 0
    a, b = load_embeddings(out, "train"), load_embeddings(second, "train")
    assert a["manifest"]["source"].startswith("finetune fake") and "source" not in b["manifest"]
    assert a["image_records"] == b["image_records"] and a["text_records"] == b["text_records"]
    for bank in ("image_bank.npy", "caption_bank.npy"):
        x, y = np.load(out / "hubness" / bank), np.load(second / "hubness" / bank)
        assert x.shape == y.shape and x.dtype == np.float32
        np.testing.assert_allclose(x, y, atol=2e-4, err_msg=bank)
    assert np.allclose(np.linalg.norm(a["images"], axis=1), 1, atol=1e-5)


def test_another_identity_embeds_train_itself(fake):
    """A build whose model differs from the checkpoint's identity (here: no mirror) does not match the
    key: it embeds train again instead of using vectors that are not its own."""
    out, backend, trained, ckpt = fake
    _save_train_embeddings(out, lit.LIT_MODEL_NAME, ckpt, trained.identity.checkpoint_sha256, backend, "fake")
    other = LoadedModel(trained.model, trained.preprocess, trained.preprocess_train, trained.tokenizer,
                        ModelIdentity(*list(trained.identity.to_dict().values())[:4], image_tta=None),
                        torch.device("cpu"))
    res = embed(out, "train", other, **TORCH, captions=False)
    assert not res["reused"] and "images_seconds" in res


def test_wrong_shapes_are_refused(fake):
    out, _, trained, _ = fake
    with pytest.raises(ValueError, match="expected"):
        save_split_embeddings(out, "train", trained.identity.to_dict(), np.zeros((2, 4), np.float32),
                              np.zeros((2, 4), np.float32), source="test")


def test_pixel_backend_writes_nothing(fake, tmp_path):
    out, _, trained, ckpt = fake
    assert _save_train_embeddings(tmp_path, lit.LIT_MODEL_NAME, ckpt, "0" * 64, object(), "fake") == {}
    assert not (tmp_path / "embeddings").exists()
