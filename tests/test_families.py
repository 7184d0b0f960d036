"""The model-family registry: lookups by name and by built model agree, and each family describes its
towers; the offline model loads from a checkpoint without a false "initialized randomly" warning."""

from __future__ import annotations

import logging

import pytest
import torch

from clipsearch import families
from clipsearch.families.lit import LitFamily
from clipsearch.families.openclip import OpenClipFamily
from clipsearch.models import load_model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model("test-tiny-vit", None, "cpu")


def test_lookup_by_name_and_by_model_agree(tiny, lit_loaded):
    assert isinstance(families.family_for("lit-effnet-minilm"), LitFamily)
    assert isinstance(families.family_for("test-tiny-vit"), OpenClipFamily)
    assert isinstance(families.family_for("ViT-B-32"), OpenClipFamily)
    for loaded in (tiny, lit_loaded):
        assert families.family_of(loaded.model) is families.family_for(loaded.identity.model)
    assert isinstance(families.family_of(torch.nn.Module()), OpenClipFamily)  # the catch-all comes last


def test_families_describe_their_towers(tiny, lit_loaded):
    oc, lit = families.family_of(tiny.model), families.family_of(lit_loaded.model)
    assert (oc.text_tower(tiny.model), oc.image_tower(tiny.model)) == ("clip", "vit")
    assert (lit.text_tower(lit_loaded.model), lit.image_tower(lit_loaded.model)) == ("hf", "timm")
    assert lit.feature_cache and lit.heads_apart and lit.pretrained_towers_without_weights and not lit.hub_tags
    assert not oc.feature_cache and oc.hub_tags
    blocks = lit.tower_blocks(lit_loaded.model)
    assert len(blocks.image) == 18 and len(blocks.text) == 7  # stem + 16 MBConv + neck; embeddings + 6 layers
    assert blocks.image_head_module is lit_loaded.model.visual.head
    groups = lit.unlock_groups(lit_loaded.model)
    assert len(groups.image) == 18 and len(groups.text) == 7
    blocks = oc.tower_blocks(tiny.model)
    assert len(blocks.image) == 3 and len(blocks.text) == 3 and blocks.text_head == ["text_projection"]
    with pytest.raises(families.UnknownTowerError):
        oc.unlock_groups(tiny.model)


def test_offline_model_from_a_checkpoint_loads_quietly(lit_loaded, tmp_path, caplog):
    ckpt = tmp_path / "lit.pt"
    torch.save(lit_loaded.model.state_dict(), ckpt)
    with caplog.at_level(logging.WARNING):
        again = load_model("lit-effnet-minilm", str(ckpt), "cpu")
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    ref = lit_loaded.model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in again.model.state_dict().items())
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a random init without a checkpoint still says so
        load_model("test-tiny-vit", None, "cpu")
    assert [r for r in caplog.records if "initialized randomly" in r.getMessage()]


def test_transformers_is_quiet_only_around_our_load():
    from transformers.utils import logging as hf_logging

    from clipsearch.lit_model import _quiet_transformers

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    before = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    try:
        with _quiet_transformers():
            assert not hf_logging.is_progress_bar_enabled()
            hf_logging.get_logger("transformers.modeling_utils").warning("LOAD REPORT inside")
        hf_logging.get_logger("transformers.modeling_utils").warning("a warning after")
    finally:
        root.removeHandler(handler)
    assert seen == ["a warning after"]
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == before
