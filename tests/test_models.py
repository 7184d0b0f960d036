import pytest
import torch

from clipsearch import models
from clipsearch.models import ModelLoadError, load_model


def test_random_init_and_identity():
    m = load_model("test-tiny-vit", None, "cpu")
    assert m.identity.embed_dim == 32 and m.identity.pretrained is None
    assert not m.model.training


def test_local_checkpoint_roundtrip_and_sha(tiny_checkpoint):
    a = load_model("test-tiny-vit", str(tiny_checkpoint), "cpu")
    assert a.identity.checkpoint_sha256 and a.identity.pretrained == str(tiny_checkpoint.resolve())
    sd = torch.load(tiny_checkpoint, weights_only=True)
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert a.identity.same_weights(a.identity.to_dict())
    with pytest.raises(ModelLoadError, match="sha256"):
        load_model("test-tiny-vit", str(tiny_checkpoint), "cpu", checkpoint_sha256="0" * 64)


def test_missing_checkpoint_and_unknown_model(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model("test-tiny-vit", str(tmp_path / "missing.pt"))
    with pytest.raises(ModelLoadError, match="Unknown model"):
        load_model("no-such-model", None)


def test_garbage_checkpoint_is_one_sentence(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="Could not load test-tiny-vit"):
        load_model("test-tiny-vit", str(bad))


def test_unreachable_hub_fails_fast_with_how_to(monkeypatch):
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ModelLoadError) as err:
        load_model("test-tiny-vit", "openai")
    msg = str(err.value)
    assert "--pretrained /path/to/" in msg and "\n" not in msg


def test_hub_probe_respects_offline_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.hub_reachable() is False
