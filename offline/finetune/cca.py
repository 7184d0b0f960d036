"""A closed-form start for the projection heads: regularised CCA of the train pairs' tower features."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from offline.finetune.config import FinetuneConfig, FinetuneError
from offline.finetune.inputs import Backend, SplitData
from offline.finetune.parts import TowerParts


def _single_linear(module: nn.Module | None, tower: str) -> nn.Linear:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)] if module is not None else []
    if len(linears) != 1 or linears[0].bias is not None:
        raise FinetuneError(f"--head-init cca needs a single bias-free linear {tower} projection head.")
    return linears[0]


@torch.no_grad()
def head_inputs(model: nn.Module, parts: TowerParts, backend: Backend,
                split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The features that enter each projection head, for every image and caption of a split."""
    captured: dict[str, list[torch.Tensor]] = {"image": [], "text": []}
    handles = []
    for name, mod in (("image", parts.image_head_module), ("text", parts.text_head_module)):
        if mod is None:
            raise FinetuneError("--head-init cca needs projection heads that are modules (lit-effnet-minilm).")
        handles.append(mod.register_forward_pre_hook(
            lambda m, inputs, name=name: captured[name].append(inputs[0].detach().float().cpu())))
    try:
        getattr(backend, "embed_plain", backend.embed)(split)  # one (unmirrored) row per image
    finally:
        for h in handles:
            h.remove()
    return torch.cat(captured["image"]), torch.cat(captured["text"])


@torch.no_grad()
def cca_init_heads(model: nn.Module, parts: TowerParts, backend: Backend, train: SplitData,
                   cfg: FinetuneConfig) -> dict[str, Any]:
    """Set both heads to the top regularised-CCA directions of the train (image, caption) pairs.

    Why: a closed-form start that uses all five captions of every image at once (InfoNCE sees one a
    epoch), so fine-tuning begins near a good linear alignment instead of from noise. Ridge keeps
    the whitening from amplifying noise directions; projecting out each tower's mean direction
    stands in for the centring the bias-free heads cannot do. Weights are rescaled to the heads'
    current norm so the learning rate means the same as for a random start.
    """
    t = time.perf_counter()
    image_lin = _single_linear(parts.image_head_module, "image")
    text_lin = _single_linear(parts.text_head_module, "text")
    xi, xt = head_inputs(model, parts, backend, train.name)
    a = xi.double()[torch.from_numpy(train.text_to_image)]
    b = xt.double()
    k = image_lin.out_features
    if k > min(a.shape[1], b.shape[1]):
        raise FinetuneError(f"--head-init cca: embedding dim {k} exceeds a tower's feature dim.")
    mean_a, mean_b = a.mean(0), b.mean(0)
    a, b = a - mean_a, b - mean_b
    n = len(a)
    caa, cbb, cab = a.T @ a / n, b.T @ b / n, a.T @ b / n

    def inv_sqrt(c: torch.Tensor) -> torch.Tensor:
        c = c + cfg.cca_reg * torch.trace(c) / len(c) * torch.eye(len(c), dtype=c.dtype)
        e, v = torch.linalg.eigh(c)
        return v @ torch.diag(e.clamp_min(1e-12) ** -0.5) @ v.T

    ka, kb = inv_sqrt(caa), inv_sqrt(cbb)
    u, corr, vt = torch.linalg.svd(ka @ cab @ kb)
    weight = corr[:k] ** (cfg.cca_power / 2)
    wa, wb = ka @ u[:, :k] * weight, kb @ vt.T[:, :k] * weight

    def drop_mean(w: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        return (torch.eye(len(mean), dtype=w.dtype) - torch.outer(mean, mean) / (mean @ mean)) @ w

    for lin, w in ((image_lin, drop_mean(wa, mean_a)), (text_lin, drop_mean(wb, mean_b))):
        w = w.T.float().to(lin.weight.device)
        lin.weight.copy_(w * (lin.weight.norm() / w.norm()))
    return {"reg": cfg.cca_reg, "power": cfg.cca_power, "pairs": n,
            "top_correlations": [round(float(c), 4) for c in corr[:5]],
            "mean_correlation": round(float(corr[:k].mean()), 4), "seconds": round(time.perf_counter() - t, 2)}

