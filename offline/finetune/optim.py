"""The optimiser and its schedule: learning rates for towers and heads, AdamW with open_clip's weight
decay rule, linear warmup then cosine to 0 (open_clip's `cosine_lr`)."""

from __future__ import annotations

import math

import torch
from torch import nn

from clipsearch.families import family_for
from clipsearch.models import normalize_pretrained
from offline.finetune.config import FinetuneConfig, FinetuneError


def resolve_lrs(cfg: FinetuneConfig, model_name: str, pretrained: str | None) -> tuple[float, float]:
    """(tower lr, head lr): gentle for pretrained weights, larger for anything freshly initialised."""
    fresh = normalize_pretrained(pretrained) is None
    # no weights at all means every weight is random (tests, benchmarks), unless the family's towers
    # come pretrained anyway (lit-effnet-minilm: only its heads start random)
    from_scratch = fresh and not family_for(model_name).pretrained_towers_without_weights
    lr = cfg.lr if cfg.lr is not None else (1e-3 if from_scratch else 1e-5)
    head_lr = cfg.head_lr if cfg.head_lr is not None else (1e-3 if fresh else lr)
    return lr, head_lr


def build_optimizer(model: nn.Module, tower: list[str], head: list[str], lr: float, head_lr: float,
                    weight_decay: float) -> torch.optim.AdamW:
    """AdamW; open_clip's rule for weight decay: none on gains, biases, norms and the logit scale."""
    params = dict(model.named_parameters())

    def decays(n: str) -> bool:
        return params[n].ndim >= 2 and not any(s in n for s in ("bn", "ln", "bias", "logit_scale"))

    groups = []
    for names, group_lr in ((tower, lr), (head, head_lr)):
        names = [n for n in names if params[n].requires_grad]
        groups += [{"params": [params[n] for n in names if decays(n)], "lr": group_lr, "weight_decay": weight_decay},
                   {"params": [params[n] for n in names if not decays(n)], "lr": group_lr, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise FinetuneError("Nothing to train: every parameter is frozen.")
    return torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-6)


def warmup_cosine(warmup: int, total: int):
    """LR multiplier per step: linear warmup, then cosine to 0 (open_clip's `cosine_lr`)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def default_warmup(total_steps: int, steps_per_epoch: int) -> int:
    return max(1, min(steps_per_epoch, round(0.05 * total_steps)))

