"""The `hubness` stage: choose, on val, the two hubness corrections and save their query banks.

The arithmetic and what it corrects are in `clipsearch.hubness`. This stage embeds the bank split
(default: train; images and captions) and the selection split (default: val), then for each direction
sweeps k ∈ `K_GRID` and β ∈ `BETAS` on the selection split and keeps the best mean R@1/5/10 of that
direction (β = 0, no correction, is always a candidate, so the stage can only keep or improve val
recall; ties go to the smaller β, then the smaller k):
- image → caption: captions offset by −β·r_c, r_c from the bank's *images*;
- text → image: images offset by −β·r_i, r_i from the bank's *captions*.
The banks are written beside the record (`<out>/hubness/{image_bank,caption_bank}.npy`), so ingest
and the service can give every new caption and image its offset. The index stage then stores the
offsets as one extra column of each caption and image index, which makes HNSW and exact search, the
evaluation and the service rank by the corrected scores; a query costs what it did.

Output: `<out>/hubness/hubness.json` (the choices, the banks' hashes, both sweeps) and `hubness.png`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from clipsearch.artifacts import ArtifactLayout
from clipsearch.hubness import (BANK_FILES, Banks, bank_similarity, correction_info, hubness_dir,
                                hubness_path, offsets_from_bank)
from clipsearch.manifest import now_iso, read_json, save_npy_atomic, sha256_file, write_json_atomic
from clipsearch.models import LoadedModel
from clipsearch.recall import KS, retrieval_metrics
from offline.embed import embed, load_embeddings, split_records
from offline.plots import plot_hubness_sweep

log = logging.getLogger(__name__)

BETAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
DEFAULT_K = 10
K_GRID = (10, 20, 50)
DEFAULT_BANK = "train"
DEFAULT_SELECT = "val"
DIRECTIONS = ("image_to_text", "text_to_image")

__all__ = ["BETAS", "DEFAULT_BANK", "DEFAULT_K", "DEFAULT_SELECT", "K_GRID", "bank_similarity", "caption_offsets",
           "hubness_path", "offsets_for_split", "read_hubness", "run_hubness", "sweep_beta"]


def caption_offsets(texts: np.ndarray, bank: np.ndarray, beta: float, k: int = DEFAULT_K) -> np.ndarray:
    """The row offsets the caption index stores: −β · r_c."""
    return offsets_from_bank(texts, bank, beta, k)


def direction_score(metrics: dict[str, Any], direction: str = "image_to_text") -> float:
    """What β and k are chosen by: the direction's mean R@1/5/10."""
    return float(np.mean([metrics[f"{direction}_R@{k}"] for k in KS]))


def sweep_beta(images: np.ndarray, texts: np.ndarray, text_to_image: np.ndarray, r: np.ndarray,
               betas: tuple[float, ...] = BETAS, direction: str = "image_to_text"
               ) -> tuple[float, list[dict[str, Any]]]:
    """The direction's recall for each β (r: the gallery's bank similarities, captions for image → text,
    images for text → image); returns the best β (ties go to the smaller) and the table."""
    rows, best, best_score = [], 0.0, -1.0
    for beta in sorted(set(betas) | {0.0}):
        off = {"text_offsets" if direction == "image_to_text" else "image_offsets": -beta * r}
        m = retrieval_metrics(images, texts, text_to_image, KS, **off)
        row = {"beta": beta, **{f"{direction}_R@{k}": m[f"{direction}_R@{k}"] for k in KS},
               f"{direction}_mean_rank": m[f"{direction}_mean_rank"]}
        rows.append(row)
        if direction_score(m, direction) > best_score + 1e-9:
            best, best_score = beta, direction_score(m, direction)
    return best, rows


def choose(sel: dict[str, Any], bank: np.ndarray, direction: str, ks: tuple[int, ...],
           betas: tuple[float, ...]) -> dict[str, Any]:
    """The best (β, k) of the grid for one direction on the selection split, with the whole sweep."""
    gallery = sel["texts"] if direction == "image_to_text" else sel["images"]
    best: dict[str, Any] | None = None
    sweep: list[dict[str, Any]] = []
    for k in sorted(set(ks)):
        beta, table = sweep_beta(sel["images"], sel["texts"], sel["text_to_image"],
                                 bank_similarity(gallery, bank, k), betas, direction)
        sweep.extend({"k": k, **row} for row in table)
        row = next(t for t in table if t["beta"] == beta)
        score = float(np.mean([row[f"{direction}_R@{q}"] for q in KS]))
        if best is None or score > best["score"] + 1e-9:
            best = {"beta": beta if beta else 0.0, "k": k if beta else min(ks), "score": score}
    assert best is not None
    return {**best, "sweep": sweep}


def run_hubness(out: Path, loaded: LoadedModel, bank_split: str = DEFAULT_BANK,
                select_split: str = DEFAULT_SELECT, k: int | tuple[int, ...] = K_GRID,
                betas: tuple[float, ...] = BETAS, embed_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Embed the bank split and the selection split, choose both corrections there, write the banks and
    hubness.json. `k`: the k (or grid of k) tried."""
    if bank_split == select_split:
        raise ValueError("the query bank and the selection split must differ (the bank would contain "
                         "the selection queries themselves)")
    t0 = time.perf_counter()
    ks = (k,) if isinstance(k, int) else tuple(k)
    kw = embed_kwargs or {}
    for split in (bank_split, select_split):
        if not ArtifactLayout(out).split_file(split).is_file() or not split_records(out, split)[0]:
            log.warning("hubness: split '%s' is empty or missing; no correction (beta = 0)", split)
            return _write_off(out, loaded, bank_split, select_split, min(ks), f"split '{split}' is empty or missing")
    embed(out, bank_split, loaded, **kw)
    embed(out, select_split, loaded, **kw)
    bank = load_embeddings(out, bank_split)
    sel = load_embeddings(out, select_split)
    model = loaded.identity.to_dict()
    for name, emb in (("bank", bank), ("selection", sel)):
        if emb["manifest"].get("model") != model:
            from clipsearch.manifest import ArtifactError
            raise ArtifactError(f"the {name} embeddings were made by another model; embed with --force")
    banks = {"captions": bank["images"], "images": bank["texts"]}  # gallery -> its query bank
    hdir = hubness_dir(out)
    shas = {}
    for gallery, vectors in banks.items():
        save_npy_atomic(hdir / BANK_FILES[gallery], np.ascontiguousarray(vectors, np.float32))
        shas[gallery] = sha256_file(hdir / BANK_FILES[gallery])
    i2t = choose(sel, banks["captions"], "image_to_text", ks, betas)
    t2i = choose(sel, banks["images"], "text_to_image", ks, betas)
    common = {"bank_split": bank_split, "selected_on": select_split,
              "selection_embeddings_manifest_sha256": sel["manifest_sha256"]}
    record = {
        # image -> caption (top level: the record's first format)
        "beta": i2t["beta"], "k": i2t["k"], **common, "bank_count": int(len(banks["captions"])),
        "bank_sha256": shas["captions"], "bank_of": "images",
        "criterion": "mean R@1/5/10 of the direction on the selection split (ties: smaller beta, then k)",
        "sweep": i2t["sweep"],
        "text_to_image": {"beta": t2i["beta"], "k": t2i["k"], **common, "bank_count": int(len(banks["images"])),
                          "bank_sha256": shas["images"], "bank_of": "captions", "sweep": t2i["sweep"]},
        "model": model,
        "created": now_iso(),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    path = hubness_path(out)
    write_json_atomic(path, record)
    plot_hubness_sweep(record, path.with_suffix(".png"))
    result: dict[str, Any] = {"json": str(path), "png": str(path.with_suffix(".png")), "seconds": record["seconds"]}
    for direction, ch, rec in (("image_to_text", i2t, record), ("text_to_image", t2i, record["text_to_image"])):
        base = next(t for t in ch["sweep"] if t["beta"] == 0.0)
        chosen = next(t for t in ch["sweep"] if t["beta"] == ch["beta"] and t["k"] == ch["k"])
        before = "/".join(f"{base[f'{direction}_R@{q}']:.2f}" for q in KS)
        after = "/".join(f"{chosen[f'{direction}_R@{q}']:.2f}" for q in KS)
        log.info("hubness %s: beta=%.2f k=%d chosen on %s (bank: %d %s %s); R@1/5/10 %s -> %s", direction,
                 ch["beta"], ch["k"], select_split, rec["bank_count"], bank_split, rec["bank_of"], before, after)
        result[direction] = {"beta": ch["beta"], "k": ch["k"], f"{select_split}_before": before,
                             f"{select_split}_after": after}
    result["beta"] = i2t["beta"]
    return result


def _write_off(out: Path, loaded: LoadedModel, bank_split: str, select_split: str, k: int,
               reason: str) -> dict[str, Any]:
    """Record that no correction applies (β = 0), and why."""
    off = {"beta": 0.0, "k": k, "bank_split": bank_split, "bank_count": 0, "selected_on": select_split,
           "bank_sha256": None, "sweep": []}
    write_json_atomic(hubness_path(out), {**off, "text_to_image": dict(off), "model": loaded.identity.to_dict(),
                                          "skipped": reason, "created": now_iso()})
    return {"beta": 0.0, "skipped": reason, "json": str(hubness_path(out))}


def read_hubness(out: Path) -> dict[str, Any] | None:
    """The stage's record, or None when the stage has not run."""
    path = hubness_path(out)
    return read_json(path) if path.is_file() else None


def offsets_for_split(out: Path, split: str, vectors: np.ndarray, model: dict[str, Any],
                      gallery: str = "captions", load_banks: Callable[[], Banks] | None = None
                      ) -> tuple[np.ndarray | None, dict[str, Any] | None]:
    """The offsets the index stage stores for `split`'s captions (or images: `gallery="images"`), and what
    to record about them; (None, None) when there is no correction to apply (no stage run, β = 0,
    another model, or the bank is this very split). `load_banks`: what reads `Banks.load(out, model)`
    (the index stage reads both banks once for both galleries)."""
    rec = read_hubness(out)
    if rec is None:
        return None, None
    part = rec if gallery == "captions" else rec.get("text_to_image") or {}
    if rec.get("model") != model:
        log.warning("hubness: %s was chosen for another model; not applied (run the hubness stage again)",
                    hubness_path(out))
        return None, None
    if part.get("bank_split") == split:
        log.warning("hubness: the query bank is split '%s' itself; not applied to its index", split)
        return None, None
    if not part.get("beta"):
        return None, None
    if part["selected_on"] == split:
        log.warning("hubness: beta was chosen on split '%s' itself, so its recall there is "
                    "not a held-out estimate", split)
    correction = getattr(load_banks() if load_banks is not None else Banks.load(out, model), gallery)
    if correction is None:
        return None, None
    return correction.offsets(vectors), correction_info(part)
