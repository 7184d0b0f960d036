"""The training loop, shared by every backend: one stage = resume, epochs, selection on val, WiSE-FT.

`train_one_epoch` is one pass over the planned batches (symmetric InfoNCE, AdamW, the schedule,
gradient clipping, the logit scale clamped at 100). `train_stage` scores the starting model on val,
resumes a saved state when the inputs and options match, runs epochs with early stopping while
keeping the best one, saves its state after each, and ends with the `wise_ft` sweep between the
start and the best epoch.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from clipsearch.manifest import save_with
from clipsearch.recall import KS, retrieval_metrics
from offline.finetune.cca import cca_init_heads
from offline.finetune.config import FinetuneConfig, FinetuneError, config_dict
from offline.finetune.guards import check_collapse, check_loss, collapse_stats
from offline.finetune.inputs import Backend, SplitData, epoch_batches
from offline.finetune.optim import build_optimizer, default_warmup, warmup_cosine
from offline.finetune.parts import (TowerParts, feature_dropout, interpolate, load_trainable, set_trainable,
                                    train_mode, trainable_state)

log = logging.getLogger(__name__)

MAX_LOGIT_SCALE = 100.0


@dataclass
class StageResult:
    config: dict[str, Any]
    backend: str
    lrs: dict[str, float]
    warmup_steps: int
    total_steps: int
    history: list[dict[str, Any]]
    start_val: dict[str, Any]
    start_collapse: dict[str, float]
    cca: dict[str, Any] | None
    best_epoch: int                   # 0 = the starting model
    best_val: dict[str, Any]
    wise_ft: list[dict[str, Any]]
    wise_alpha: float
    final_val: dict[str, Any]
    stopped: str
    seconds: float
    resumed_from_epoch: int = 0
    soup: dict[str, Any] | None = None  # members and the soup's val score, when cfg.soup > 1


@dataclass
class _Best:
    """The best weights seen so far on val (epoch 0 = the starting model)."""

    epoch: int
    score: float
    val: dict[str, Any]
    state: dict[str, torch.Tensor]


def val_score(metrics: dict[str, Any]) -> float:
    """Mean of R@1, R@5, R@10 over both directions (what selection maximises)."""
    keys = [f"{d}_R@{k}" for d in ("text_to_image", "image_to_text") for k in KS]
    return float(np.mean([metrics[k] for k in keys]))


def recall_of(backend: Backend, split: SplitData) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    img, txt = backend.embed(split.name)
    metrics = retrieval_metrics(img, txt, split.text_to_image, KS)
    return {k: v for k, v in metrics.items() if "_R@" in k or "median" in k}, img, txt


def train_one_epoch(model: nn.Module, backend: Backend, train: SplitData, parts: TowerParts, cfg: FinetuneConfig,
                    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                    loss_fn: nn.Module, epoch: int, device: torch.device, label: str) -> list[float]:
    """One pass over `train` in this epoch's planned batches; returns each step's loss."""
    torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout / augmentation draws, reproducible on resume
    batches = epoch_batches(train.groups, epoch, cfg.seed, cfg.batch_size)
    max_log_scale = math.log(MAX_LOGIT_SCALE)
    train_mode(model)
    losses: list[float] = []
    with feature_dropout(parts, cfg.feature_dropout), \
            tqdm(total=len(batches), desc=f"{label} epoch {epoch + 1}/{cfg.epochs}", unit="step",
                 leave=False) as bar:
        for step, batch in enumerate(backend.inputs(batches)):
            with _autocast(device):
                img_emb, txt_emb = backend.forward(batch)
                loss = loss_fn(img_emb.float(), txt_emb.float(), model.logit_scale.exp())
            check_loss(loss, epoch, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                               cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, max_log_scale)
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def train_stage(model: nn.Module, backend: Backend, splits: dict[str, SplitData], cfg: FinetuneConfig,
                parts: TowerParts, lrs: tuple[float, float], state_path: Path | None, key: str,
                device: torch.device, label: str = "finetune") -> StageResult:
    """Train on `splits['train']`, select on `splits['val']`; the model ends holding the chosen weights."""
    t0 = time.perf_counter()
    tower, head = set_trainable(model, parts, cfg)
    if cfg.init_logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(cfg.init_logit_scale))
    cca_info = cca_init_heads(model, parts, backend, splits["train"], cfg) if cfg.head_init == "cca" else None
    optimizer = build_optimizer(model, tower, head, *lrs, cfg.weight_decay)
    steps_per_epoch = len(epoch_batches(splits["train"].groups, 0, cfg.seed, cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else default_warmup(total, steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total))
    loss_fn = _clip_loss()

    start_state = trainable_state(model)
    start_val, img, txt = recall_of(backend, splits["val"])
    if not (np.isfinite(img).all() and np.isfinite(txt).all()):
        raise FinetuneError("The starting model gives non-finite embeddings; check the checkpoint.")
    start_cos = collapse_stats(img, txt)
    best = _Best(0, val_score(start_val), start_val, start_state)
    history: list[dict[str, Any]] = []
    first_epoch = 0
    resumed = _resume(state_path, key, model, optimizer, scheduler, label)
    if resumed is not None:
        history, first_epoch, best = resumed

    stopped = "max_epochs"
    since_best = sum(1 for h in history if h["epoch"] > best.epoch)
    if first_epoch and since_best >= cfg.patience:
        stopped = "early_stopping"
    for epoch in range(first_epoch, cfg.epochs):
        if stopped == "early_stopping":
            break
        te = time.perf_counter()
        losses = train_one_epoch(model, backend, splits["train"], parts, cfg, optimizer, scheduler, loss_fn,
                                 epoch, device, label)
        val, img, txt = recall_of(backend, splits["val"])
        collapse = check_collapse(img, txt, cfg.collapse_cosine, f"after epoch {epoch + 1}", start_cos)
        score = val_score(val)
        row = {"stage": label, "epoch": epoch + 1, "loss": round(float(np.mean(losses)), 5),
               "lr": optimizer.param_groups[0]["lr"], "logit_scale": round(float(model.logit_scale.detach().exp()), 3),
               "val": val, "val_score": round(score, 3), **collapse,
               "seconds": round(time.perf_counter() - te, 2)}
        history.append(row)
        improved = score > best.score
        if improved:
            best = _Best(epoch + 1, score, val, trainable_state(model))
        log.info("%s epoch %d: loss %.4f  val T→I R@1 %.2f  I→T R@1 %.2f  score %.2f%s", label, epoch + 1,
                 row["loss"], val["text_to_image_R@1"], val["image_to_text_R@1"], score, " *" if improved else "")
        if state_path is not None:
            _save_state(state_path, {
                "key": key, "epoch": epoch + 1, "model": trainable_state(model),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "history": history,
                "best_epoch": best.epoch, "best_score": best.score, "best_val": best.val,
                "best_state": best.state})
        since_best = 0 if improved else since_best + 1
        if since_best >= cfg.patience and epoch + 1 < cfg.epochs:
            stopped = "early_stopping"

    sweep, alpha, final_val = wise_ft(model, backend, splits["val"], start_state, start_val, best, cfg.wise_alphas)
    model.eval()
    return StageResult(
        config=config_dict(cfg), backend=backend.kind, lrs={"tower": lrs[0], "head": lrs[1]},
        warmup_steps=warmup, total_steps=total, history=history, start_val=start_val, start_collapse=start_cos,
        cca=cca_info, best_epoch=best.epoch, best_val=best.val, wise_ft=sweep, wise_alpha=alpha,
        final_val=final_val, stopped=stopped, seconds=round(time.perf_counter() - t0, 2),
        resumed_from_epoch=first_epoch)


def wise_ft(model: nn.Module, backend: Backend, val: SplitData, start_state: dict[str, torch.Tensor],
            start_val: dict[str, Any], best: _Best, alphas: tuple[float, ...]
            ) -> tuple[list[dict[str, Any]], float, dict[str, Any]]:
    """WiSE-FT between the starting weights and the best epoch, (1 - α) start + α best, scored on val
    for each α (1 always among them; ties go to the larger α). Leaves the model at the chosen α;
    returns (the sweep, that α, its val recall)."""
    sweep: list[dict[str, Any]] = []
    best_alpha, best_alpha_score, best_alpha_val = 1.0, -1.0, best.val
    for alpha in sorted(set(alphas) | {1.0}):
        if alpha == 0.0:
            metrics = start_val
        elif alpha == 1.0:
            metrics = best.val
        else:
            load_trainable(model, interpolate(start_state, best.state, alpha))
            metrics = recall_of(backend, val)[0]
        score = val_score(metrics)
        sweep.append({"alpha": alpha, "val": metrics, "val_score": round(score, 3)})
        if score > best_alpha_score + 1e-9 or (abs(score - best_alpha_score) <= 1e-9 and alpha > best_alpha):
            best_alpha, best_alpha_score, best_alpha_val = alpha, score, metrics
    load_trainable(model, interpolate(start_state, best.state, best_alpha))
    return sweep, best_alpha, best_alpha_val


def _resume(state_path: Path | None, key: str, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, label: str
            ) -> tuple[list[dict[str, Any]], int, _Best] | None:
    """(history, epochs done, best so far) from the state saved after an epoch, loaded into the model,
    optimiser and schedule; None when there is none, or it is from other inputs or options."""
    if state_path is None or not state_path.is_file():
        return None
    saved = torch.load(state_path, map_location="cpu", weights_only=True)
    if saved.get("key") != key:
        log.info("%s: ignoring a saved state from different inputs or options", label)
        return None
    load_trainable(model, saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    first_epoch = int(saved["epoch"])
    best = _Best(int(saved["best_epoch"]), float(saved["best_score"]), dict(saved["best_val"]), saved["best_state"])
    log.info("%s: resuming after epoch %d (best so far: epoch %d)", label, first_epoch, best.epoch)
    return list(saved["history"]), first_epoch, best


def _autocast(device: torch.device) -> AbstractContextManager[Any]:
    """bf16 autocast on GPU only; the weights stay fp32 either way."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _clip_loss() -> nn.Module:
    from open_clip.loss import ClipLoss

    return ClipLoss()


def _save_state(path: Path, state: dict[str, Any]) -> None:
    save_with(path, lambda tmp: torch.save(state, tmp))

