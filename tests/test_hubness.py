"""The hubness correction: caption offsets in the index, β chosen on val, applied by index/evaluate."""

import json

import numpy as np
import pytest

from clipsearch.index import IndexParams, VectorIndex, recall_vs_exact
from clipsearch.recall import KS, retrieval_metrics
from offline.cli import main
from offline.hubness import bank_similarity, caption_offsets, sweep_beta


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _hub_world(rng, n, d=32):
    """n images with one caption each. Every image shares a common direction g; a fifth of the
    captions lean hard on g too, so they sit close to every image: hubs that crowd out the right
    caption in image -> text search."""
    g = np.zeros(d)
    g[0] = 1
    z = rng.normal(size=(n, d))
    z[:, 0] = 0
    z = _unit(z)
    images = _unit(z + 0.9 * g)
    lean = np.where(rng.random(n) < 0.2, 1.5, 0.3)
    texts = _unit(_unit(z + 0.9 * rng.normal(size=(n, d)) / np.sqrt(d)) + lean[:, None] * g)
    return images, texts


def test_index_with_row_offsets_ranks_by_score_plus_offset(tmp_path):
    rng = np.random.default_rng(0)
    base, queries = _unit(rng.normal(size=(1500, 24))), _unit(rng.normal(size=(40, 24)))
    offsets = (-0.3 * rng.random(len(base))).astype(np.float32)
    want = queries @ base.T + offsets[None]
    flat = VectorIndex.build(base, IndexParams(kind="flat"), offsets=offsets)
    assert flat.dim == 24 and flat.has_offsets
    scores, ids = flat.search(queries, 10)
    assert (ids == np.argsort(-want, axis=1)[:, :10]).all()
    np.testing.assert_allclose(scores, np.take_along_axis(want, ids, 1), atol=1e-5)
    hnsw = VectorIndex.build(base, IndexParams(ef_search=200), offsets=offsets)
    assert recall_vs_exact(hnsw.search(queries, 10)[1], ids) > 0.95
    # the offsets survive a save/load round trip, read back from the index itself
    loaded = VectorIndex.load(hnsw.save(tmp_path, "texts.hnsw"))
    assert loaded.dim == 24 and loaded.manifest["dim"] == 24 and loaded.manifest["row_offsets"] is True
    np.testing.assert_allclose(loaded.offsets(), offsets, atol=1e-6)
    assert (loaded.search(queries, 10)[1] == hnsw.search(queries, 10)[1]).all()
    # offsets are read back in chunks of 65,536 rows
    many = (-rng.random(70000)).astype(np.float32)
    big = VectorIndex.build(np.zeros((70000, 4), np.float32), IndexParams(kind="flat"), offsets=many)
    np.testing.assert_array_equal(big.offsets(), many)
    plain = VectorIndex.build(base, IndexParams(kind="flat"))
    assert not plain.has_offsets and not plain.offsets().any()
    with pytest.raises(ValueError, match="offsets"):
        VectorIndex.build(base, IndexParams(), offsets=offsets[:10])
    with pytest.raises(ValueError, match="finite"):
        VectorIndex.build(base, IndexParams(), offsets=np.full(len(base), np.nan, np.float32))


def test_bank_similarity_and_offsets_match_brute_force():
    rng = np.random.default_rng(1)
    texts, bank = _unit(rng.normal(size=(70, 16))), _unit(rng.normal(size=(90, 16)))
    sims = texts @ bank.T
    want = np.sort(sims, axis=1)[:, -10:].mean(1)
    np.testing.assert_allclose(bank_similarity(texts, bank, 10, chunk=16), want, atol=1e-6)
    np.testing.assert_allclose(caption_offsets(texts, bank, 0.5, 10), -0.5 * want, atol=1e-6)
    # k larger than the bank averages over the whole bank
    np.testing.assert_allclose(bank_similarity(texts, bank[:3], 10), sims[:, :3].mean(1), atol=1e-6)
    with pytest.raises(ValueError, match="empty"):
        bank_similarity(texts, bank[:0], 10)


def test_recall_with_text_offsets_matches_manual_ranks():
    rng = np.random.default_rng(2)
    images, texts = _unit(rng.normal(size=(30, 8))), _unit(rng.normal(size=(60, 8)))
    t2i = np.repeat(np.arange(30), 2)
    offsets = (-0.4 * rng.random(60)).astype(np.float32)
    m = retrieval_metrics(images, texts, t2i, KS, text_offsets=offsets)
    scores = images @ texts.T + offsets[None]
    ranks = np.array([1 + (s > s[t2i == i].max()).sum() for i, s in enumerate(scores)])
    for k in KS:
        assert m[f"image_to_text_R@{k}"] == round(100 * float(np.mean(ranks <= k)), 2)
    # text -> image does not use the caption offsets
    plain = retrieval_metrics(images, texts, t2i, KS)
    assert all(m[f"text_to_image_R@{k}"] == plain[f"text_to_image_R@{k}"] for k in KS)


@pytest.mark.parametrize("direction, seed", [("image_to_text", 3), ("text_to_image", 5)])
def test_beta_chosen_on_one_split_lifts_recall_on_a_held_out_one(direction, seed):
    """Image -> text: hub captions penalised by their mean cosine to another split's images. Text ->
    image, the mirror correction: the same world with the roles swapped, so the hubs are images,
    penalised by their mean cosine to another split's captions."""
    rng = np.random.default_rng(seed)
    i2t = direction == "image_to_text"
    other = "text_to_image" if i2t else "image_to_text"

    def world(n):  # (images, texts): for text -> image the hubs are the images
        pair = _hub_world(rng, n)
        return pair if i2t else pair[::-1]

    bank_img, bank_txt = world(300)
    bank = bank_img if i2t else bank_txt  # the bank: the other modality, from another split
    val_img, val_txt = world(300)
    test_img, test_txt = world(300)
    gallery_val, gallery_test = (val_txt, test_txt) if i2t else (val_img, test_img)
    ids = np.arange(300)
    beta, table = sweep_beta(val_img, val_txt, ids, bank_similarity(gallery_val, bank), direction=direction)
    assert table[0]["beta"] == 0.0 and beta > 0 and f"{other}_R@1" not in table[0]
    score = {t["beta"]: np.mean([t[f"{direction}_R@{k}"] for k in KS]) for t in table}
    assert score[beta] == max(score.values())
    before = retrieval_metrics(test_img, test_txt, ids, KS)
    offsets = caption_offsets(gallery_test, bank, beta)
    after = retrieval_metrics(test_img, test_txt, ids, KS,
                              **({"text_offsets": offsets} if i2t else {"image_offsets": offsets}))
    assert after[f"{direction}_R@1"] > before[f"{direction}_R@1"] + 20
    assert after[f"{other}_R@1"] == before[f"{other}_R@1"]  # the other direction is not touched


def test_build_chooses_beta_on_val_and_index_and_evaluate_apply_it(tiny_dataset, tiny_checkpoint, tmp_path):
    out = tmp_path / "art"
    common = ["--out", str(out), "--threads", "1"]
    model = ["--model", "test-tiny-vit", "--pretrained", str(tiny_checkpoint), "--workers", "0",
             "--batch-size", "4"]
    assert main(["build", "--data", str(tiny_dataset), "--split", "random", "--ratios", "0.5,0.25,0.25",
                 "--no-sweep", *common, *model]) == 0
    hub = json.loads((out / "hubness/hubness.json").read_text())
    assert hub["bank_split"] == "train" and hub["selected_on"] == "val" and hub["k"] == 10
    assert hub["bank_count"] == 6 and (out / "hubness/hubness.png").is_file()
    assert [t["beta"] for t in hub["sweep"]][0] == 0.0 and hub["beta"] in [t["beta"] for t in hub["sweep"]]
    assert {t["k"] for t in hub["sweep"]} == {10, 20, 50}  # the k grid, swept for each k
    t2i_hub = hub["text_to_image"]
    assert t2i_hub["bank_count"] == 18 and t2i_hub["bank_of"] == "captions"  # 6 train images x 3 captions
    assert {t["k"] for t in t2i_hub["sweep"]} == {10, 20, 50}
    # the banks are files of their own, the train split's vectors
    np.testing.assert_array_equal(np.load(out / "hubness/image_bank.npy"), np.load(out / "embeddings/train/images.npy"))
    np.testing.assert_array_equal(np.load(out / "hubness/caption_bank.npy"), np.load(out / "embeddings/train/texts.npy"))

    # whatever the tiny random model chose, serve fixed betas and check every consumer applies them
    hub["beta"] = 0.5
    hub["text_to_image"]["beta"], hub["text_to_image"]["k"] = 0.4, 5
    (out / "hubness/hubness.json").write_text(json.dumps(hub))
    assert main(["index", "--no-sweep", *common]) == 0
    assert main(["evaluate", *common]) == 0
    emb = {p: np.load(out / f"embeddings/test/{p}.npy") for p in ("images", "texts")}
    texts = json.loads((out / "embeddings/test/texts.json").read_text())
    images = [r["image_id"] for r in json.loads((out / "embeddings/test/images.json").read_text())]
    t2i = np.array([images.index(t["image_id"]) for t in texts])
    bank = np.load(out / "embeddings/train/images.npy")
    want = -0.5 * bank_similarity(emb["texts"], bank, 10)
    want_img = -0.4 * bank_similarity(emb["images"], np.load(out / "embeddings/train/texts.npy"), 5)
    for kind in ("hnsw", "flat"):
        idx = VectorIndex.load(out / f"indexes/test/texts.{kind}.json")
        assert idx.manifest["hubness"]["beta"] == 0.5
        np.testing.assert_allclose(idx.offsets(), want, atol=1e-5)
        img_idx = VectorIndex.load(out / f"indexes/test/images.{kind}.json")
        assert img_idx.manifest["hubness"]["beta"] == 0.4 and img_idx.manifest["hubness"]["k"] == 5
        np.testing.assert_allclose(img_idx.offsets(), want_img, atol=1e-5)
    rec = json.loads((out / "results/recall_test.json").read_text())
    corrected = retrieval_metrics(emb["images"], emb["texts"], t2i, KS, text_offsets=want, image_offsets=want_img)
    raw = retrieval_metrics(emb["images"], emb["texts"], t2i, KS)
    for k in KS:
        assert rec[f"image_to_text_R@{k}"] == corrected[f"image_to_text_R@{k}"]
        assert rec[f"text_to_image_R@{k}"] == corrected[f"text_to_image_R@{k}"]
        for d in ("image_to_text", "text_to_image"):
            assert rec["without_hubness_correction"][f"{d}_R@{k}"] == raw[f"{d}_R@{k}"]
    assert rec["hubness"]["beta"] == 0.5 and rec["hubness_images"]["beta"] == 0.4

    # --no-hubness goes back to plain indexes
    assert main(["index", "--no-sweep", "--no-hubness", *common]) == 0
    assert not VectorIndex.load(out / "indexes/test/texts.hnsw.json").has_offsets
    assert not VectorIndex.load(out / "indexes/test/images.hnsw.json").has_offsets
    assert main(["evaluate", *common]) == 0
    rec = json.loads((out / "results/recall_test.json").read_text())
    assert rec["hubness"] is None and rec["hubness_images"] is None and "without_hubness_correction" not in rec
    assert all(rec[f"image_to_text_R@{k}"] == raw[f"image_to_text_R@{k}"] for k in KS)


def test_offsets_are_not_applied_when_they_would_not_be_honest(tmp_path, caplog):
    from clipsearch.manifest import write_json_atomic
    from offline.hubness import hubness_path, offsets_for_split

    texts = _unit(np.random.default_rng(4).normal(size=(5, 8)))
    assert offsets_for_split(tmp_path, "test", texts, {"model": "a"}) == (None, None)  # stage never ran
    rec = {"beta": 0.5, "k": 10, "bank_split": "train", "bank_count": 3, "selected_on": "val",
           "bank_embeddings_manifest_sha256": "x", "model": {"model": "a"}}
    write_json_atomic(hubness_path(tmp_path), rec)
    with caplog.at_level("WARNING"):
        # chosen for another model
        assert offsets_for_split(tmp_path, "test", texts, {"model": "b"}) == (None, None)
        # the bank is the searched split itself: its own queries would shape their ranking
        assert offsets_for_split(tmp_path, "train", texts, {"model": "a"}) == (None, None)
    assert "another model" in caplog.text and "bank is split 'train' itself" in caplog.text
    write_json_atomic(hubness_path(tmp_path), {**rec, "beta": 0.0})
    assert offsets_for_split(tmp_path, "test", texts, {"model": "a"}) == (None, None)
    # the bank's embeddings changed after beta was chosen
    write_json_atomic(hubness_path(tmp_path), rec)
    with pytest.raises(Exception, match="image embeddings|missing"):
        offsets_for_split(tmp_path, "test", texts, {"model": "a"})


def test_an_empty_bank_or_selection_split_turns_the_correction_off(tmp_path):
    from types import SimpleNamespace

    from offline.hubness import hubness_path, offsets_for_split, run_hubness

    (tmp_path / "splits").mkdir()
    (tmp_path / "splits/train.jsonl").write_text("")
    loaded = SimpleNamespace(identity=SimpleNamespace(to_dict=lambda: {"model": "m"}))
    res = run_hubness(tmp_path, loaded)  # never reaches the model: nothing to embed
    assert res["beta"] == 0.0 and "train" in res["skipped"]
    assert json.loads(hubness_path(tmp_path).read_text())["beta"] == 0.0
    assert offsets_for_split(tmp_path, "test", np.zeros((2, 4), np.float32), {"model": "m"}) == (None, None)
