"""What a run leaves behind: the checkpoint, the results JSON and its plot, and the summary it returns."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipsearch.artifacts import ArtifactLayout
from clipsearch.manifest import save_with, sha256_file, write_json_atomic
from offline.finetune.loop import StageResult
from offline.plots import plot_finetune_curves


def save_checkpoint(model: nn.Module, path: Path) -> str:
    """The full model state dict (weights only), atomically; returns its sha256."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_with(path, lambda tmp: torch.save(state, tmp))
    return sha256_file(path)


def stage_dict(res: StageResult, label: str) -> dict[str, Any]:
    d = asdict(res)
    d["label"] = label
    return d


def write_results(out: Path, name: str, record: dict[str, Any]) -> tuple[Path, Path]:
    res_dir = ArtifactLayout(out).results_dir
    json_path, png_path = res_dir / f"finetune_{name}.json", res_dir / f"finetune_{name}.png"
    write_json_atomic(json_path, record)
    plot_finetune_curves(record, png_path)
    return json_path, png_path


def summary(record: dict[str, Any], reused: bool, seconds: float) -> dict[str, Any]:
    res_dir = ArtifactLayout(Path(record["checkpoint"]).parent.parent).results_dir  # <out>/models/<name>.pt
    out = {"checkpoint": record["checkpoint"], "checkpoint_sha256": record["checkpoint_sha256"],
           "results": str(res_dir / f"finetune_{record['name']}.json"),
           "plot": str(res_dir / f"finetune_{record['name']}.png"), "reused": reused,
           "seconds": round(seconds, 2)}
    for which in ("start", "final"):
        rec = (record.get("test") or {}).get(which)
        if rec:
            out[f"test_{which}"] = {k: rec[k] for k in rec if "_R@" in k}
    out["val_final"] = {k: v for k, v in record["val"]["final"].items() if "_R@" in k}
    return out

