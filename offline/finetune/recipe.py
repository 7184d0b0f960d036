"""The offline model's recipe: how `build --model lit-effnet1-minilm` (or the older lit-effnet-minilm)
trains its checkpoint."""

from __future__ import annotations

from pathlib import Path

from clipsearch.models import OFFLINE_MODEL
from offline.finetune.config import FinetuneConfig
from offline.finetune.runner import finetune


def offline_recipe(seed: int = 0) -> list[tuple[str, FinetuneConfig]]:
    """LiT for the offline models: heads on the locked towers, started from regularised CCA of the train
    pairs and averaged over 4 seeds (a soup), then the last two MiniLM layers unlocked. Both stages
    train on each image or its mirror and select on mirror-averaged val images, as the model is served
    (image_tta mirror). Unlocking the last image block instead never beat its starting point on val
    (docs/offline_model.md)."""
    heads = FinetuneConfig(
        epochs=60, lr=0.0, head_lr=2e-3, weight_decay=0.2, batch_size=1024, lock_image=True, lock_text=True,
        feature_dropout=0.3, patience=10, wise_alphas=(1.0,), seed=seed, init_logit_scale=1 / 0.07,
        head_init="cca", soup=4, mirror=True)
    text = FinetuneConfig(
        epochs=6, lr=2e-4, head_lr=2e-4, weight_decay=0.2, batch_size=256, lock_image=True,
        unlock_text_last=2, feature_dropout=0.3, patience=3, wise_alphas=(0.0, 0.5, 0.75, 1.0), seed=seed,
        mirror=True)
    return [("heads", heads), ("unlock_text_last2", text)]


def offline_run_name(seed: int = 0, model: str | None = None) -> str:
    """The name `train_offline_model` gives its run: the checkpoint is `<out>/models/<name>.pt`."""
    model = model or OFFLINE_MODEL
    return f"{model}-ft" if seed == 0 else f"{model}-ft-s{seed}"


def train_offline_model(out: Path, threads: int, device: str, seed: int = 0, model: str | None = None) -> Path:
    """Train an offline model's heads (then its last two MiniLM layers) on train, select on val; returns the
    checkpoint path. `model`: one of `clipsearch.lit_model.LIT_MODELS` (default the offline model,
    lit-effnet1-minilm). Idempotent: the same splits and recipe reuse the existing checkpoint."""
    model = model or OFFLINE_MODEL
    name = offline_run_name(seed, model)
    summary = finetune(out, model, None, offline_recipe(seed), name, device=device,
                       workers=min(2, max(1, threads or 1)), threads=threads)
    return Path(summary["checkpoint"])

