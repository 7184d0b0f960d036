"""The `hubness` stage: a per-caption score offset that corrects hubness in image → caption search.

In a shared embedding space some captions are *hubs*: generic sentences ("a dog runs on the grass")
sit close to very many images and crowd the top of many image queries' result lists, pushing out the
caption that actually describes the query. CSLS (Conneau et al., 2018) and query-bank normalisation
(Bogolin et al., 2022) correct this by penalising each caption by how close it is to typical queries:

    score(query image q, caption c) = cos(q, c) − β · r_c,
    r_c = mean cosine of c to its k nearest images in a *query bank*.

The bank is the image embeddings of another split (default: train), never the split being searched
or evaluated, so nothing about the test queries leaks into their ranking. β is chosen on a selection
split (default: val) by image → text recall; β = 0 (no correction) is always a candidate, so the
stage can only keep or improve val recall. The index stage then stores `−β · r_c` as each caption's
row offset in the caption index (`clipsearch.index`), which makes HNSW and exact search, the
evaluation and the service's `/search/image` all rank by the corrected score. Text → image search is
untouched.

Output: `<out>/hubness/hubness.json` (the chosen β, k, the bank, and the β sweep on the selection
split) and `hubness.png` (that sweep).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.manifest import ArtifactError, now_iso, read_json, write_json_atomic
from clipsearch.models import LoadedModel
from clipsearch.recall import KS, retrieval_metrics
from offline.embed import embed, load_embeddings, load_image_embeddings, split_records
from offline.plots import plot_hubness_sweep

log = logging.getLogger(__name__)

BETAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
DEFAULT_K = 10
DEFAULT_BANK = "train"
DEFAULT_SELECT = "val"


def hubness_path(out: Path) -> Path:
    return Path(out) / "hubness" / "hubness.json"


def bank_similarity(texts: np.ndarray, bank: np.ndarray, k: int = DEFAULT_K, chunk: int = 2048) -> np.ndarray:
    """r_c: each caption's mean cosine to its k nearest bank images (exact; chunked over captions)."""
    if len(bank) == 0:
        raise ValueError("the query bank is empty")
    k = min(k, len(bank))
    out = np.empty(len(texts), dtype=np.float32)
    for start in range(0, len(texts), chunk):
        sims = texts[start:start + chunk] @ bank.T
        out[start:start + chunk] = np.partition(sims, -k, axis=1)[:, -k:].mean(axis=1)
    return out


def caption_offsets(texts: np.ndarray, bank: np.ndarray, beta: float, k: int = DEFAULT_K) -> np.ndarray:
    """The row offsets the caption index stores: −β · r_c."""
    return (-float(beta) * bank_similarity(texts, bank, k)).astype(np.float32)


def i2t_score(metrics: dict[str, Any]) -> float:
    """What β is chosen by: mean image → text R@1/5/10."""
    return float(np.mean([metrics[f"image_to_text_R@{k}"] for k in KS]))


def sweep_beta(images: np.ndarray, texts: np.ndarray, text_to_image: np.ndarray, r: np.ndarray,
               betas: tuple[float, ...] = BETAS) -> tuple[float, list[dict[str, Any]]]:
    """Image → text recall for each β; returns the best β (ties go to the smaller) and the table."""
    rows, best, best_score = [], 0.0, -1.0
    for beta in sorted(set(betas) | {0.0}):
        m = retrieval_metrics(images, texts, text_to_image, KS, text_offsets=-beta * r)
        row = {"beta": beta, **{f"image_to_text_R@{k}": m[f"image_to_text_R@{k}"] for k in KS},
               "image_to_text_mean_rank": m["image_to_text_mean_rank"]}
        rows.append(row)
        if i2t_score(m) > best_score + 1e-9:
            best, best_score = beta, i2t_score(m)
    return best, rows


def run_hubness(out: Path, loaded: LoadedModel, bank_split: str = DEFAULT_BANK,
                select_split: str = DEFAULT_SELECT, k: int = DEFAULT_K, betas: tuple[float, ...] = BETAS,
                embed_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Embed the bank's images and the selection split, choose β there, write hubness.json."""
    if bank_split == select_split:
        raise ValueError("the query bank and the selection split must differ (the bank would contain "
                         "the selection queries themselves)")
    t0 = time.perf_counter()
    kw = embed_kwargs or {}
    for split in (bank_split, select_split):
        if not (Path(out) / "splits" / f"{split}.jsonl").is_file() or not split_records(out, split)[0]:
            log.warning("hubness: split '%s' is empty or missing; no correction (beta = 0)", split)
            return _write_off(out, loaded, bank_split, select_split, k, f"split '{split}' is empty or missing")
    embed(out, bank_split, loaded, captions=False, **kw)
    embed(out, select_split, loaded, **kw)
    bank = load_image_embeddings(out, bank_split)
    sel = load_embeddings(out, select_split)
    for name, m in (("bank", bank["manifest"]), ("selection", sel["manifest"])):
        if m.get("model") != loaded.identity.to_dict():
            raise ArtifactError(f"the {name} embeddings were made by another model; embed with --force")
    r = bank_similarity(sel["texts"], bank["images"], k)
    beta, table = sweep_beta(sel["images"], sel["texts"], sel["text_to_image"], r, betas)
    base = next(t for t in table if t["beta"] == 0.0)
    chosen = next(t for t in table if t["beta"] == beta)
    record = {
        "beta": beta,
        "k": k,
        "bank_split": bank_split,
        "bank_count": int(len(bank["images"])),
        "bank_embeddings_manifest_sha256": bank["manifest_sha256"],
        "selected_on": select_split,
        "selection_embeddings_manifest_sha256": sel["manifest_sha256"],
        "criterion": "mean image->text R@1/5/10 on the selection split (ties: smaller beta)",
        "model": loaded.identity.to_dict(),
        "sweep": table,
        "created": now_iso(),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    path = hubness_path(out)
    write_json_atomic(path, record)
    plot_hubness_sweep(record, path.with_suffix(".png"))
    log.info("hubness: beta=%.2f chosen on %s (bank: %d %s images, k=%d); %s I→T R@1/5/10 %s -> %s",
             beta, select_split, len(bank["images"]), bank_split, k, select_split,
             "/".join(f"{base[f'image_to_text_R@{k_}']:.2f}" for k_ in KS),
             "/".join(f"{chosen[f'image_to_text_R@{k_}']:.2f}" for k_ in KS))
    return {"beta": beta, "json": str(path), "png": str(path.with_suffix(".png")),
            f"{select_split}_image_to_text_before": {k_: base[f"image_to_text_R@{k_}"] for k_ in KS},
            f"{select_split}_image_to_text_after": {k_: chosen[f"image_to_text_R@{k_}"] for k_ in KS},
            "seconds": record["seconds"]}


def _write_off(out: Path, loaded: LoadedModel, bank_split: str, select_split: str, k: int,
               reason: str) -> dict[str, Any]:
    """Record that no correction applies (β = 0), and why."""
    write_json_atomic(hubness_path(out), {
        "beta": 0.0, "k": k, "bank_split": bank_split, "bank_count": 0, "selected_on": select_split,
        "bank_embeddings_manifest_sha256": None, "model": loaded.identity.to_dict(), "skipped": reason,
        "sweep": [], "created": now_iso()})
    return {"beta": 0.0, "skipped": reason, "json": str(hubness_path(out))}


def read_hubness(out: Path) -> dict[str, Any] | None:
    """The stage's record, or None when the stage has not run."""
    path = hubness_path(out)
    return read_json(path) if path.is_file() else None


def offsets_for_split(out: Path, split: str, texts: np.ndarray, model: dict[str, Any]
                      ) -> tuple[np.ndarray | None, dict[str, Any] | None]:
    """The caption offsets the index stage stores for `split`, and what to record about them; (None,
    None) when there is no correction to apply (no stage run, β = 0, another model, or the bank is
    this very split)."""
    rec = read_hubness(out)
    if rec is None:
        return None, None
    if rec.get("model") != model:
        log.warning("hubness: %s was chosen for another model; not applied (run the hubness stage again)",
                    hubness_path(out))
        return None, None
    if rec["bank_split"] == split:
        log.warning("hubness: the query bank is split '%s' itself; not applied to its index", split)
        return None, None
    if not rec["beta"]:
        return None, None
    if rec["selected_on"] == split:
        log.warning("hubness: beta was chosen on split '%s' itself, so its image->text recall there is "
                    "not a held-out estimate", split)
    bank = load_image_embeddings(out, rec["bank_split"])
    if bank["manifest_sha256"] != rec["bank_embeddings_manifest_sha256"]:
        raise ArtifactError(f"the '{rec['bank_split']}' image embeddings changed since the hubness stage "
                            f"chose beta; run it again")
    offsets = caption_offsets(texts, bank["images"], rec["beta"], rec["k"])
    info = {k: rec[k] for k in ("beta", "k", "bank_split", "bank_count", "bank_embeddings_manifest_sha256",
                                "selected_on")}
    return offsets, info
