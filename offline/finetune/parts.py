"""Which parameters train: each tower's blocks and the heads (from the model's family), freezing,
BatchNorm kept frozen, feature dropout on the heads' inputs, and the trained state itself (a copy, a
load, WiSE-FT interpolation)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clipsearch.families import UnknownTowerError, family_of
from offline.finetune.config import FinetuneConfig, FinetuneError


@dataclass
class TowerParts:
    """Parameter names grouped as each tower's blocks (input to output) and the projection heads."""

    image_blocks: list[list[str]]
    text_blocks: list[list[str]]
    head: list[str]                       # projection heads + logit scale/bias
    image_head_module: nn.Module | None   # where feature dropout goes (input of the image head)
    text_head_module: nn.Module | None


def _group_by_prefix(names: list[str], prefixes: list[list[str]]) -> list[list[str]]:
    blocks: list[list[str]] = [[] for _ in prefixes]
    for n in names:
        for i, pre in enumerate(prefixes):
            if any(n == p or n.startswith(p + ".") for p in pre):
                blocks[i].append(n)
                break
    return blocks


def tower_parts(model: nn.Module) -> TowerParts:
    """Blocks and heads of `model`, as its family lays them out (`clipsearch.families`).

    Parameters of a tower that no block names (rare extras such as attention pooling) join its first
    block, so they train only when the whole tower does.
    """
    names = [n for n, _ in model.named_parameters()]
    head = [n for n in names if n in ("logit_scale", "logit_bias")]
    try:
        blocks = family_of(model).tower_blocks(model)
    except UnknownTowerError as exc:
        raise FinetuneError(f"{exc}; use the default full fine-tune (no --lock-*/--unlock-* options) "
                            "for this model.") from exc
    heads = _group_by_prefix(names, [blocks.image_head, blocks.text_head])
    head += heads[0] + heads[1]
    taken = set(head)
    rest = [n for n in names if n not in taken]
    image_names = [n for n in rest if n.startswith("visual.")]
    text_names = [n for n in rest if not n.startswith("visual.")]
    image_blocks = _group_by_prefix(image_names, blocks.image)
    text_blocks = _group_by_prefix(text_names, blocks.text)
    image_blocks[0] += sorted(set(image_names) - {n for b in image_blocks for n in b})
    text_blocks[0] += sorted(set(text_names) - {n for b in text_blocks for n in b})
    return TowerParts(image_blocks, text_blocks, head, blocks.image_head_module, blocks.text_head_module)


def whole_model_parts(model: nn.Module) -> TowerParts:
    """For a plain full fine-tune of a model whose blocks we do not know: everything is one block."""
    names = [n for n, _ in model.named_parameters()]
    head = [n for n in names if n in ("logit_scale", "logit_bias")]
    rest = [n for n in names if n not in head]
    return TowerParts([[n for n in rest if n.startswith("visual.")]],
                      [[n for n in rest if not n.startswith("visual.")]], head, None, None)


def _trailing(blocks: list[list[str]], unlocked: int | None) -> list[str]:
    if unlocked is None:
        return [n for b in blocks for n in b]
    if unlocked > len(blocks):
        raise FinetuneError(f"Cannot unlock the last {unlocked} blocks: this tower has {len(blocks)}.")
    return [n for b in blocks[len(blocks) - unlocked:] for n in b] if unlocked else []


def set_trainable(model: nn.Module, parts: TowerParts, cfg: FinetuneConfig) -> tuple[list[str], list[str]]:
    """Freeze everything but the chosen blocks and the heads; returns (tower names, head names) that train."""
    tower = _trailing(parts.image_blocks, cfg.image_unlocked()) + _trailing(parts.text_blocks, cfg.text_unlocked())
    train = set(tower) | set(parts.head)
    for n, p in model.named_parameters():
        p.requires_grad_(n in train)
    return tower, list(parts.head)


def train_mode(model: nn.Module) -> None:
    """model.train() with every BatchNorm kept in eval mode (frozen statistics)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@contextmanager
def feature_dropout(parts: TowerParts, p: float) -> Iterator[None]:
    """Dropout on the input of each projection head while the model is in train mode."""
    if p <= 0:
        yield
        return
    mods = [m for m in (parts.image_head_module, parts.text_head_module) if m is not None]
    if len(mods) != 2:
        raise FinetuneError("--feature-dropout needs projection heads that are modules "
                            "(lit-effnet-minilm); this model's projections are bare matrices.")

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]):
        return (F.dropout(inputs[0], p, module.training), *inputs[1:])

    handles = [m.register_forward_pre_hook(hook) for m in mods]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def interpolate(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT: (1 - α) start + α end, for the parameters that were trained."""
    return {n: torch.lerp(start[n], end[n], alpha) if alpha not in (0.0, 1.0) else
            (start[n] if alpha == 0.0 else end[n]).clone() for n in end}

