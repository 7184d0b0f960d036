"""Every PNG the offline stages write: the index stage's efSearch sweep, the hubness stage's β sweep
and a fine-tuning run's curves. matplotlib (Agg, no display) is imported only when a plot is drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.manifest import save_with
from clipsearch.recall import KS


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, dpi: int) -> None:
    """Lay out `fig`, write it to `path` as a PNG atomically, and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    save_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    plt.close(fig)


def plot_ef_sweep(result: dict[str, Any], path: Path) -> None:
    """The index stage's efSearch sweep: recall@k vs exact against ms per query, one line per index."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for target, label in (("images", "text→image (image index)"), ("texts", "image→text (caption index)")):
        rows = [r for r in result["rows"] if r["index"] == target]
        rkey = next(k for k in rows[0] if k.startswith("recall@"))
        xs, ys = [r["ms_per_query"] for r in rows], [r[rkey] for r in rows]
        ax.plot(xs, ys, marker="o", label=f"HNSW {label}")
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(str(r["ef_search"]), (x, y), textcoords="offset points", xytext=(3, -10), fontsize=7)
        ax.axvline(rows[0]["flat_ms_per_query"], linestyle=":", color=ax.lines[-1].get_color(),
                   label=f"exact flat, {target}")
    ax.set_xscale("log")
    ax.set_xlabel("ms per query (batched, log scale)")
    ax.set_ylabel(f"recall@{result['k']} vs exact")
    ax.set_title(f"HNSW efSearch sweep, split '{result['split']}' (labels: efSearch)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, path, dpi=120)


def plot_hubness_sweep(record: dict[str, Any], path: Path) -> None:
    """The hubness stage's sweeps on the selection split: for each direction, R@1 and R@10 against β,
    one line per k, the chosen (β, k) marked."""
    plt = _pyplot()
    parts = [("image_to_text", "image → text", "caption", "images", record)]
    if record.get("text_to_image"):
        parts.append(("text_to_image", "text → image", "image", "captions", record["text_to_image"]))
    fig, axes = plt.subplots(1, len(parts), figsize=(6.0 * len(parts), 4.2), squeeze=False)
    for ax, (d, title, gallery, bank_of, rec) in zip(axes[0], parts):
        sweep = rec.get("sweep") or []
        for k in sorted({r.get("k", record.get("k")) for r in sweep}):
            rows = [r for r in sweep if r.get("k", record.get("k")) == k]
            for q, style in ((1, "-"), (10, "--")):
                ax.plot([r["beta"] for r in rows], [r[f"{d}_R@{q}"] for r in rows], style, marker="o",
                        markersize=3, label=f"R@{q}, k = {k}")
        ax.axvline(rec["beta"], linestyle=":", color="grey", label=f"chosen β = {rec['beta']:g}, k = {rec['k']}")
        ax.set_xlabel(f"β (penalty on a {gallery}'s mean cosine to its k nearest bank {bank_of})")
        ax.set_ylabel(f"{title} recall on {record['selected_on']} (%)")
        ax.set_title(f"{title}: bank = {rec.get('bank_count')} {record['bank_split']} {bank_of}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path, dpi=120)


def plot_finetune_curves(record: dict[str, Any], path: Path) -> None:
    """A fine-tuning run: train loss and val recall per epoch, stage boundaries dotted."""
    plt = _pyplot()
    hist = record["history"]
    x = np.arange(1, len(hist) + 1)
    fig, (ax_loss, ax_rec) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax_loss.plot(x, [h["loss"] for h in hist], "o-", color="black")
    ax_loss.set_xlabel("epoch (all stages)")
    ax_loss.set_ylabel("train InfoNCE loss")
    ax_loss.set_title("training loss")
    colors = {1: "tab:blue", 5: "tab:orange", 10: "tab:green"}
    for d, style, short in (("text_to_image", "-", "T→I"), ("image_to_text", "--", "I→T")):
        for k in KS:
            ax_rec.plot(x, [h["val"][f"{d}_R@{k}"] for h in hist], style, color=colors[k], label=f"{short} R@{k}")
    starts = [i for i in range(1, len(hist)) if hist[i]["stage"] != hist[i - 1]["stage"]]
    for ax in (ax_loss, ax_rec):
        for s in starts:
            ax.axvline(s + 0.5, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    ax_rec.set_xlabel("epoch (all stages)")
    ax_rec.set_ylabel("val recall (%)")
    test = record.get("test", {}).get("final")
    title = f"val recall — {record['name']}"
    if test:
        title += (f"\ntest T→I {test['text_to_image_R@1']:.1f}/{test['text_to_image_R@5']:.1f}/"
                  f"{test['text_to_image_R@10']:.1f}, I→T {test['image_to_text_R@1']:.1f}/"
                  f"{test['image_to_text_R@5']:.1f}/{test['image_to_text_R@10']:.1f} (R@1/5/10)")
    ax_rec.set_title(title, fontsize=9)
    ax_rec.legend(fontsize=8, ncol=2)
    _save(fig, path, dpi=110)
