"""End to end through the CLI on a tiny synthetic dataset and a tiny ViT checkpoint."""

import json

import numpy as np
import pytest

from offline.cli import build_parser, main


def test_build_end_to_end_then_reuse(tiny_dataset, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "art"
    argv = ["build", "--data", str(tiny_dataset), "--split", "random", "--ratios", "0.5,0.25,0.25",
            "--seed", "1", "--out", str(out), "--model", "test-tiny-vit", "--pretrained",
            str(tiny_checkpoint), "--workers", "0", "--batch-size", "4", "--threads", "1"]
    assert main(argv) == 0
    for rel in ("splits/train.jsonl", "splits/val.jsonl", "splits/test.jsonl", "validation_report.json",
                "embeddings/test/images.npy", "embeddings/test/texts.json", "embeddings/test/manifest.json",
                "indexes/test/images.hnsw.json", "indexes/test/texts.flat.json",
                "results/sweep_test.json", "results/sweep_test.png", "results/recall_test.json",
                "results/results_log.jsonl"):
        assert (out / rel).is_file(), rel

    manifest = json.loads((out / "embeddings/test/manifest.json").read_text())
    assert manifest["model"]["model"] == "test-tiny-vit" and manifest["model"]["checkpoint_sha256"]
    images = np.load(out / "embeddings/test/images.npy")
    recs = json.loads((out / "embeddings/test/images.json").read_text())
    assert images.shape == (len(recs), 32) and images.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1, atol=1e-5)
    # splits are by image: no image in two splits
    ids = {}
    for s in ("train", "val", "test"):
        ids[s] = {json.loads(l)["image_id"] for l in (out / f"splits/{s}.jsonl").read_text().splitlines()}
    assert not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])

    recall = json.loads((out / "results/recall_test.json").read_text())
    for d in ("text_to_image", "image_to_text"):
        for k in (1, 5, 10):
            assert 0 <= recall[f"{d}_R@{k}"] <= 100
            assert f"{d}_R@{k}" in recall["hnsw"]
    assert recall["model"]["model"] == "test-tiny-vit"
    index_manifest = json.loads((out / "indexes/test/images.hnsw.json").read_text())
    assert index_manifest["params"]["ef_search"] == 100 and index_manifest["model"] == manifest["model"]
    sweep = json.loads((out / "results/sweep_test.json").read_text())
    assert {r["ef_search"] for r in sweep["rows"]} >= {16, 100, 512}

    # second run: every stage reuses its outputs, and the log gets a second record
    emb_mtime = (out / "embeddings/test/images.npy").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{\n"):])
    assert summary["embed"]["reused"] is True
    assert set(summary["index"]["indexes"].values()) == {"reused"}
    assert (out / "embeddings/test/images.npy").stat().st_mtime_ns == emb_mtime
    assert len((out / "results/results_log.jsonl").read_text().splitlines()) == 2


def test_errors_are_one_line_and_exit_2(tmp_path, capsys, tiny_dataset):
    assert main(["prepare", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert main(["evaluate", "--out", str(tmp_path / "empty")]) == 2
    assert "missing file" in capsys.readouterr().err
    assert main(["embed", "--out", str(tmp_path), "--model", "nope", "--pretrained", "none"]) == 2
    assert "Unknown model" in capsys.readouterr().err


def test_help_documents_every_stage(capsys):
    parser = build_parser()
    for stage in ("prepare", "download", "embed", "index", "evaluate", "build"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args([stage, "--help"])
        assert e.value.code == 0
        assert "--out" in capsys.readouterr().out or stage == "download"
