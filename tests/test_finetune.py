"""The finetune stage on a tiny open_clip model and synthetic coloured shapes (no dataset, no hub)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from clipsearch.encoder import ClipEncoder
from clipsearch.models import load_model
from clipsearch.recall import retrieval_metrics
from offline import finetune as ft

TINY = "test-tiny-vit"
COLORS = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 40, 220), "yellow": (235, 220, 20),
          "purple": (140, 30, 170), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
TEMPLATES = ("a {c} {s}", "a {s} that is {c}", "one {c} {s} on a white background")


def shape_image(rgb, shape: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(225, 256, 3)))
    d = ImageDraw.Draw(im)
    r = int(rng.integers(8, 13))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=rgb)
    elif shape == "square":
        d.rectangle(box, fill=rgb)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=rgb)
    return im


def write_splits(out, per_combo: dict[str, int], seed: int = 0) -> None:
    """Splits as the prepare stage writes them: one record per caption."""
    rng = np.random.default_rng(seed)
    (out / "img").mkdir(parents=True, exist_ok=True)
    (out / "splits").mkdir(exist_ok=True)
    for split, n in per_combo.items():
        rows = []
        for cname, rgb in COLORS.items():
            for shape in SHAPES:
                for k in range(n):
                    image_id = f"{split}_{cname}_{shape}_{k}.png"
                    path = out / "img" / image_id
                    shape_image(rgb, shape, rng).save(path)
                    for j, tmpl in enumerate(TEMPLATES):
                        rows.append({"image_id": image_id, "image_path": str(path),
                                     "caption_id": f"{image_id}#{j}", "caption": tmpl.format(c=cname, s=shape)})
        (out / "splits" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # a tiny model gains nothing from a second thread, and on a shared machine OpenMP's spinning
    # threads slow it down by an order of magnitude
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shapes_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft")
    # 18 colour x shape combinations: 3 train images each, 1 val and 1 test image each (chance R@1 = 5.6 %)
    write_splits(out, {"train": 3, "val": 1, "test": 1})
    return out


def tiny_cfg(**kw) -> ft.FinetuneConfig:
    base = dict(epochs=8, lr=2e-3, head_lr=2e-3, weight_decay=0.05, batch_size=18, warmup_steps=6, patience=8,
                wise_alphas=(0.0, 0.5, 1.0), seed=0, eval_test=True)
    base.update(kw)
    return ft.FinetuneConfig(**base)


@pytest.fixture(scope="module")
def tiny_run(shapes_out):
    torch.manual_seed(0)
    summary = ft.finetune(shapes_out, TINY, None, [("finetune", tiny_cfg())], "tiny-ft", device="cpu",
                          workers=0, eval_batch=64)
    record = json.loads((shapes_out / "results" / "finetune_tiny-ft.json").read_text())
    return summary, record


def test_epoch_batches_one_caption_per_image_resampled():
    groups = [np.arange(5 * i, 5 * i + 5) for i in range(40)]
    b0 = ft.epoch_batches(groups, 0, seed=1, batch_size=16)
    b1 = ft.epoch_batches(groups, 1, seed=1, batch_size=16)
    assert [len(b[0]) for b in b0] == [16, 16]  # the short last batch (8) is dropped
    for imgs, caps in b0 + b1:
        assert len(set(imgs.tolist())) == len(imgs)  # distinct images: no image is its own negative
        assert all(c // 5 == i for i, c in zip(imgs, caps))  # each caption belongs to its image
    caps0 = {int(i): int(c) for imgs, caps in b0 for i, c in zip(imgs, caps)}
    caps1 = {int(i): int(c) for imgs, caps in b1 for i, c in zip(imgs, caps)}
    common = caps0.keys() & caps1.keys()
    assert any(caps0[i] != caps1[i] for i in common)  # captions drawn again each epoch
    again = ft.epoch_batches(groups, 0, seed=1, batch_size=16)
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(b0, again))  # resumable


def test_finetune_lifts_val_recall_without_collapse(tiny_run, shapes_out):
    summary, record = tiny_run
    start, final = record["val"]["start"], record["val"]["final"]
    chance_r1 = 100 / 18
    assert final["text_to_image_R@1"] >= 4 * chance_r1, final
    assert final["image_to_text_R@1"] >= 4 * chance_r1, final
    assert ft.val_score(final) > ft.val_score(start) + 20
    hist = record["history"]
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert all(h["image_mean_cosine"] < 0.99 and h["text_mean_cosine"] < 0.99 for h in hist)
    assert record["test"]["start"] and record["test"]["final"]
    assert (shapes_out / "results" / "finetune_tiny-ft.png").stat().st_size > 1000
    # the checkpoint loads through the shared loader and reproduces the selected val recall
    loaded = load_model(TINY, summary["checkpoint"], "cpu")
    enc = ClipEncoder(loaded, batch_size=64)
    val = ft.read_split_data(shapes_out, "val")
    images = [Image.open(p).convert("RGB") for p in val.image_paths]
    metrics = retrieval_metrics(enc.encode_images(images), enc.encode_texts(val.captions), val.text_to_image)
    for k, v in final.items():
        if "_R@" in k:
            assert metrics[k] == pytest.approx(v, abs=1e-6), k
    # a second run with the same inputs reuses the checkpoint
    again = ft.finetune(shapes_out, TINY, None, [("finetune", tiny_cfg())], "tiny-ft", device="cpu", workers=0)
    assert again["reused"] and again["checkpoint_sha256"] == summary["checkpoint_sha256"]


def test_wise_ft_alpha_zero_is_the_starting_model(shapes_out):
    torch.manual_seed(0)
    loaded = load_model(TINY, None, "cpu")
    start_sd = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    splits = {s: ft.read_split_data(shapes_out, s) for s in ("train", "val")}
    backend = ft.PixelBackend(loaded, splits, workers=0, eval_batch=64)
    before = backend.embed("val")
    parts = ft.tower_parts(loaded.model)
    cfg = tiny_cfg(epochs=2, wise_alphas=(0.0,))
    start = ft.trainable_state(loaded.model)
    ft.train_stage(loaded.model, backend, splits, cfg, parts, (2e-3, 2e-3), None, "k", loaded.device)
    tuned = ft.trainable_state(loaded.model)
    assert any(not torch.equal(start[n], tuned[n]) for n in start)
    ft.load_trainable(loaded.model, ft.interpolate(start, tuned, 0.0))
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in start_sd.items())
    after = backend.embed("val")
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    half = ft.interpolate(start, tuned, 0.5)
    n = next(iter(start))
    torch.testing.assert_close(half[n], (start[n] + tuned[n]) / 2)


def test_nan_loss_stops_with_message(shapes_out):
    torch.manual_seed(0)
    with pytest.raises(ft.FinetuneError, match=r"Loss became nan.*lower --lr"):
        ft.finetune(shapes_out, TINY, None, [("finetune", tiny_cfg(epochs=3, lr=1e30, head_lr=1e30, grad_clip=0))],
                    "tiny-nan", device="cpu", workers=0)
    assert not (shapes_out / "models" / "tiny-nan.pt").exists()


class ToyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(np.log(10.0), dtype=torch.float32))
        self.image = torch.nn.Linear(8, 4)
        self.text = torch.nn.Linear(8, 4)


class CollapsingBackend:
    """A deterministic fake: distinct val embeddings before training, one shared vector after."""

    kind = "fake"

    def __init__(self, model: ToyModel):
        self.model = model
        self.calls = 0
        self.codes = torch.eye(8)

    def inputs(self, batches):
        for imgs, caps in batches:
            yield torch.from_numpy(imgs), torch.from_numpy(caps) // 2

    def forward(self, batch):
        f = torch.nn.functional.normalize
        return f(self.model.image(self.codes[batch[0]]), dim=-1), f(self.model.text(self.codes[batch[1]]), dim=-1)

    def embed(self, split):
        self.calls += 1
        emb = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        if self.calls > 1:
            emb = np.tile(np.float32([[0.6, 0.8, 0.0, 0.0]]), (8, 1))
        return emb, np.repeat(emb, 2, axis=0)


def toy_split(name: str) -> ft.SplitData:
    t2i = np.repeat(np.arange(8), 2)
    return ft.SplitData(name, [str(i) for i in range(8)], [""] * 8, [f"c{i}" for i in range(16)], t2i,
                        [np.array([2 * i, 2 * i + 1]) for i in range(8)], "sha")


def test_collapse_stops_with_message():
    model = ToyModel()
    parts = ft.TowerParts([["image.weight", "image.bias"]], [["text.weight", "text.bias"]], ["logit_scale"],
                          None, None)
    splits = {"train": toy_split("train"), "val": toy_split("val")}
    with pytest.raises(ft.FinetuneError, match=r"collapsed after epoch 1: mean pairwise cosine .* is 1\.000"):
        ft.train_stage(model, CollapsingBackend(model), splits, tiny_cfg(epochs=3, batch_size=4), parts,
                       (1e-3, 1e-3), None, "k", torch.device("cpu"))


def test_collapse_limit_is_relative_for_a_model_that_starts_near_one():
    rng = np.random.default_rng(0)
    spread = rng.normal(size=(50, 16)).astype(np.float32)
    tight = spread * 0.05 + 1.0  # mean cosine ~0.997, like a random init
    tight /= np.linalg.norm(tight, axis=1, keepdims=True)
    spread /= np.linalg.norm(spread, axis=1, keepdims=True)
    start = ft.collapse_stats(tight, tight)
    assert start["image_mean_cosine"] > 0.99
    assert ft.check_collapse(tight, tight, 0.99, "at start", start)  # not collapsed relative to itself
    with pytest.raises(ft.FinetuneError, match="collapsed"):
        ft.check_collapse(tight, tight, 0.99, "after epoch 1")  # absolute limit
    ft.check_collapse(spread, spread, 0.99, "after epoch 1")


def test_mean_pairwise_cosine():
    x = torch.nn.functional.normalize(torch.randn(100, 16), dim=-1)
    full = x @ x.T
    expected = (full.sum() - full.diagonal().sum()) / (100 * 99)
    assert ft.mean_pairwise_cosine(x) == pytest.approx(float(expected), abs=1e-5)
    assert ft.mean_pairwise_cosine(np.ones((5, 4)) / 2) == pytest.approx(1.0)


def test_lock_and_unlock_last_blocks():
    torch.manual_seed(0)
    model = load_model(TINY, None, "cpu").model
    parts = ft.tower_parts(model)
    assert len(parts.image_blocks) == 1 + 2 and len(parts.text_blocks) == 1 + 2  # stem + 2 resblocks
    tower, head = ft.set_trainable(model, parts, ft.FinetuneConfig(lock_text=True, unlock_image_last=1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "visual.proj" in trainable and "text_projection" in trainable and "logit_scale" in trainable
    assert any(n.startswith("visual.transformer.resblocks.1.") for n in trainable)
    assert "visual.ln_post.weight" in trainable
    assert not any(n.startswith(("visual.transformer.resblocks.0.", "visual.conv1", "transformer.",
                                 "token_embedding")) for n in trainable)
    with pytest.raises(ft.FinetuneError, match="has 3"):
        ft.set_trainable(model, parts, ft.FinetuneConfig(unlock_image_last=5))


def test_warmup_cosine_schedule():
    f = ft.warmup_cosine(10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    assert ft.default_warmup(total_steps=10_000, steps_per_epoch=23) == 23  # never more than an epoch


lit = pytest.importorskip("clipsearch.lit_model")


def test_feature_path_matches_the_full_model(tmp_path):
    """Cached tower features through the trainable end give what the whole model gives, so the
    checkpoint trained on features reproduces its val numbers through load_model + ClipEncoder."""
    write_splits(tmp_path, {"val": 1})
    torch.manual_seed(0)
    model, preprocess_train, preprocess, tokenizer = lit.build_lit_model("cpu", load_towers=False)
    from clipsearch.models import LoadedModel, ModelIdentity

    loaded = LoadedModel(model, preprocess, preprocess_train, tokenizer,
                         ModelIdentity(lit.LIT_MODEL_NAME, None, None, lit.LIT_EMBED_DIM), torch.device("cpu"))
    val = ft.read_split_data(tmp_path, "val")
    feats = ft.extract_features(tmp_path, loaded, {"val": val}, image_cut=2, text_cut=2, workers=0, batch_size=8)
    f = feats["val"]
    assert f["images"][2].shape[1:] == (192, 7, 7) and f["images"][0].shape == (val.n_images, 1280)
    assert f["texts"][0].shape == (len(val.captions), 384) and len(f["texts"][2]) == len(val.captions)
    enc = ClipEncoder(loaded, batch_size=16)
    images = [Image.open(p).convert("RGB") for p in val.image_paths]

    def check(pairs):
        ref_img, ref_txt = enc.encode_images(images), enc.encode_texts(val.captions)
        for unlocked in pairs:
            backend = ft.FeatureBackend(model, feats, {"val": val}, *unlocked, device=torch.device("cpu"))
            img, txt = backend.embed("val")
            np.testing.assert_allclose(img, ref_img, atol=2e-4, err_msg=str(unlocked))
            np.testing.assert_allclose(txt, ref_txt, atol=5e-5, err_msg=str(unlocked))

    check([(0, 0), (1, 0), (0, 1)])
    with torch.no_grad():  # train-like changes to the unlocked blocks and heads: the backends that run
        # those blocks themselves must follow them (cut-0 caches predate them by design)
        for p in (*model.visual.trunk.conv_head.parameters(), *model.visual.head.parameters(),
                  *model.text.proj.parameters(), *model.text.transformer.encoder.layer[-1].parameters()):
            p.add_(0.05 * torch.randn_like(p))
    check([(1, 1), (2, 2), (1, 2), (2, 1)])
    # a second call reads the cache
    again = ft.extract_features(tmp_path, loaded, {"val": val}, image_cut=2, text_cut=2, workers=0)
    assert torch.equal(again["val"]["images"][2], f["images"][2])
    assert torch.equal(again["val"]["texts"][2].flat, f["texts"][2].flat)


def test_mirror_features_match_the_mirrored_encoder_and_train_on_both(tmp_path):
    """With mirror=True the cache holds each image's mirror too: the backend's val images equal what
    the served encoder gives with image_tta "mirror", the plain embedding (for CCA) equals the
    unmirrored encoder, and training batches mix images and mirrors."""
    write_splits(tmp_path, {"train": 1, "val": 1})
    torch.manual_seed(0)
    model, preprocess_train, preprocess, tokenizer = lit.build_lit_model("cpu", load_towers=False)
    from clipsearch.models import LoadedModel, ModelIdentity

    def loaded_with(tta):
        return LoadedModel(model, preprocess, preprocess_train, tokenizer,
                           ModelIdentity(lit.LIT_MODEL_NAME, None, None, lit.LIT_EMBED_DIM, image_tta=tta),
                           torch.device("cpu"))

    splits = {s: ft.read_split_data(tmp_path, s) for s in ("train", "val")}
    feats = ft.extract_features(tmp_path, loaded_with(None), splits, image_cut=1, text_cut=0, workers=0,
                                batch_size=8, mirror=True)
    assert feats["val"]["images_mirror"][1].shape == feats["val"]["images"][1].shape
    assert not torch.allclose(feats["val"]["images_mirror"][0], feats["val"]["images"][0])
    val_images = [Image.open(p).convert("RGB") for p in splits["val"].image_paths]
    for unlocked in ((0, 0), (1, 0)):
        backend = ft.FeatureBackend(model, feats, splits, *unlocked, device=torch.device("cpu"), mirror=True)
        img, _ = backend.embed("val")
        np.testing.assert_allclose(img, ClipEncoder(loaded_with("mirror"), batch_size=16).encode_images(val_images),
                                   atol=2e-4, err_msg=str(unlocked))
        plain, _ = backend.embed_plain("val")
        np.testing.assert_allclose(plain, ClipEncoder(loaded_with(None), batch_size=16).encode_images(val_images),
                                   atol=2e-4, err_msg=str(unlocked))
    train = splits["train"]
    rows = np.arange(train.n_images)
    torch.manual_seed(1)
    (images, _), = backend.inputs([(rows, rows[:len(rows)])])
    orig, mirrored = feats["train"]["images"][1], feats["train"]["images_mirror"][1]
    is_orig = [torch.equal(images[i], orig[i]) for i in rows]
    is_mirror = [torch.equal(images[i], mirrored[i]) for i in rows]
    assert all(a != b for a, b in zip(is_orig, is_mirror))  # each row is exactly one of the two
    assert 0 < sum(is_mirror) < len(rows)
    with pytest.raises(ft.FinetuneError, match="mirror"):
        ft.FeatureBackend(model, ft.extract_features(tmp_path, loaded_with(None), splits, 1, 0, workers=0),
                          splits, 0, 0, device=torch.device("cpu"), mirror=True)


def test_mirror_on_the_pixel_path_is_refused(shapes_out):
    with pytest.raises(ft.FinetuneError, match="--mirror needs the cached-feature path"):
        ft.finetune(shapes_out, TINY, None, [("finetune", tiny_cfg(mirror=True))], "tiny-mirror", device="cpu",
                    workers=0)
    assert not (shapes_out / "models" / "tiny-mirror.pt").exists()


def test_mirror_option_leaves_earlier_run_keys_alone():
    """Runs from before --mirror existed keep their key (and so their checkpoint) when it is off."""
    cfg = ft.FinetuneConfig(epochs=3, seed=2)
    assert "mirror" not in ft.config_dict(cfg)
    assert ft.config_dict(ft.FinetuneConfig(epochs=3, seed=2, mirror=True))["mirror"] is True


def test_token_states_round_trip():
    torch.manual_seed(0)
    lengths = torch.tensor([3, 1, 4, 2])
    hidden = torch.randn(4, 4, 5)
    mask = (torch.arange(4)[None] < lengths[:, None]).long()
    states = ft.TokenStates.from_batches([(torch.tensor([2, 0]), hidden[[2, 0]], mask[[2, 0]]),
                                          (torch.tensor([3, 1]), hidden[[3, 1]], mask[[3, 1]])], 4)
    assert states.offsets.tolist() == [0, 3, 4, 8, 10]
    h, m = states.batch(np.array([1, 2]))
    assert h.shape == (2, 4, 5) and m.tolist() == [[1, 0, 0, 0], [1, 1, 1, 1]]
    torch.testing.assert_close(h[0, :1], hidden[1, :1])
    torch.testing.assert_close(h[1], hidden[2])
    assert (h[0, 1:] == 0).all()


class LinearPairBackend:
    """Deterministic fake: fixed tower features through the toy model's two linear heads."""

    kind = "fake"

    def __init__(self, model, feats):
        self.model, self.feats = model, feats

    def embed(self, split):
        f = torch.nn.functional.normalize
        with torch.no_grad():
            img, txt = self.feats[split]
            return (f(self.model.image(img), dim=-1).numpy(), f(self.model.text(txt), dim=-1).numpy())


def test_cca_head_init_aligns_linearly_related_towers():
    rng = np.random.default_rng(0)
    n_img, caps = 60, 3
    latent = rng.normal(size=(n_img, 4))  # what image and captions share
    img = latent @ rng.normal(size=(4, 16)) + 0.1 * rng.normal(size=(n_img, 16)) + 3.0  # offset: no centring in heads
    txt = np.repeat(latent, caps, 0) @ rng.normal(size=(4, 12)) + 0.3 * rng.normal(size=(n_img * caps, 12)) + 2.0
    t2i = np.repeat(np.arange(n_img), caps)
    split = ft.SplitData("train", [str(i) for i in range(n_img)], [""] * n_img, [""] * len(t2i), t2i,
                         [np.arange(caps * i, caps * i + caps) for i in range(n_img)], "sha")
    model = ToyModel()
    model.image, model.text = torch.nn.Linear(16, 4, bias=False), torch.nn.Linear(12, 4, bias=False)
    parts = ft.TowerParts([["image.weight"]], [["text.weight"]], ["logit_scale"], model.image, model.text)
    backend = LinearPairBackend(model, {"train": (torch.tensor(img, dtype=torch.float32),
                                                  torch.tensor(txt, dtype=torch.float32))})
    before = retrieval_metrics(*backend.embed("train"), t2i)
    norm = model.image.weight.norm().item()
    info = ft.cca_init_heads(model, parts, backend, split, ft.FinetuneConfig(cca_reg=0.01))
    after = retrieval_metrics(*backend.embed("train"), t2i)
    assert info["pairs"] == n_img * caps and info["top_correlations"][0] > 0.9
    assert after["text_to_image_R@1"] > 80 and after["image_to_text_R@1"] > 80
    assert after["text_to_image_R@1"] > before["text_to_image_R@1"] + 40
    assert model.image.weight.norm().item() == pytest.approx(norm, rel=1e-5)  # lr keeps its meaning
    with pytest.raises(ft.FinetuneError, match="bias-free linear"):
        model.image = torch.nn.Linear(16, 4)
        ft.cca_init_heads(model, ft.TowerParts([], [], [], model.image, model.text), backend, split,
                          ft.FinetuneConfig())


def test_soup_averages_members_from_one_start_and_selects_on_val(shapes_out, tmp_path):
    torch.manual_seed(0)
    loaded = load_model(TINY, None, "cpu")
    model = loaded.model
    splits = {s: ft.read_split_data(shapes_out, s) for s in ("train", "val")}
    backend = ft.PixelBackend(loaded, splits, workers=0, eval_batch=64)
    parts = ft.tower_parts(model)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = tiny_cfg(epochs=2, wise_alphas=(1.0,), lock_image=True, lock_text=True, lr=0.0, head_lr=5e-3)
    members = []
    for seed in (0, 1):  # what the soup's members are: the same stage from the same start, other seeds
        model.load_state_dict(start)
        ft.train_stage(model, backend, splits, ft.FinetuneConfig(**{**ft.asdict(cfg), "seed": seed}), parts,
                       (0.0, 5e-3), None, "k", loaded.device)
        members.append(ft.trainable_state(model))
    assert any(not torch.equal(members[0][n], members[1][n]) for n in members[0])
    model.load_state_dict(start)
    res = ft.soup_stage(model, backend, splits, ft.FinetuneConfig(**{**ft.asdict(cfg), "soup": 2}), parts,
                        (0.0, 5e-3), tmp_path / "0-heads.pt", "k", loaded.device, label="heads")
    info = res.soup
    assert [m["seed"] for m in info["members"]] == [0, 1]
    assert {h["stage"] for h in res.history} == {"heads/s0", "heads/s1"}
    now = ft.trainable_state(model)
    best = max(info["members"], key=lambda m: m["val_score"])
    if info["chosen"] == "soup":  # kept only because it beats every member on val
        assert info["soup_val_score"] > best["val_score"]
        for n in now:
            torch.testing.assert_close(now[n], (members[0][n] + members[1][n]) / 2)
        assert res.final_val == info["soup_val"]
    else:
        assert info["chosen"] == f"seed {best['seed']}" and info["soup_val_score"] <= best["val_score"]
        for n in now:
            torch.testing.assert_close(now[n], members[best["seed"]][n])
    # frozen towers are untouched either way
    for k, v in start.items():
        if k not in now:
            assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(ft.FinetuneError, match="soup"):
        ft.validate_config(ft.FinetuneConfig(soup=0))
