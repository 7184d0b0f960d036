"""The base class of a model family: what clipsearch needs to know about one kind of open_clip model.

A family answers, for the models it builds: how to create one (weights and preprocessing), what its
two towers are (which picks the torch text fast path and the ONNX export variant), which parts of
each tower are blocks that can be frozen or unlocked, input to output, and which are the projection
heads. The encoder, the ONNX runtime and fine-tuning ask the registry (`clipsearch.families`) for
the family instead of probing a model's attributes or class names themselves.

Shaped after Immich's `InferenceModel` base class (one subclass per model type, one factory that
picks it) and open_clip's `_build_vision_tower` / `_build_text_tower` (a tower's type decided in one
place). A family holds no state; the registry keeps one instance of each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

import torch
from torch import nn

# What runs a text tower: open_clip's own causal CLIP transformer pooled at the end-of-text token
# ("clip"), or a Hugging Face encoder behind open_clip's HFTextEncoder ("hf"). Both have an ONNX
# export (`clipsearch.onnx.text`); "clip" also has the truncated torch path (`clipsearch.towers`).
TextTower = Literal["clip", "hf"]
# What runs an image tower: a timm trunk behind open_clip's TimmModel ("timm"), open_clip's
# VisionTransformer ("vit"). `clipsearch.onnx.image` exports the timm ones.
ImageTower = Literal["timm", "vit"]
# (model, preprocess_train, preprocess_val, tokenizer), as open_clip.create_model_and_transforms + get_tokenizer
Built = tuple[nn.Module, Callable[[Any], torch.Tensor], Callable[[Any], torch.Tensor], Any]


class UnknownTowerError(ValueError):
    """The family does not know the block layout of this tower (message: which tower)."""


@dataclass
class TowerBlocks:
    """A model's parameters by name prefix: each tower's blocks, input to output, and the heads.

    A parameter belongs to a block when its name equals one of the block's prefixes or starts with
    one followed by a dot.
    """

    image: list[list[str]]
    text: list[list[str]]
    image_head: list[str]
    text_head: list[str]
    image_head_module: nn.Module | None   # the image projection as a module (its input: the tower's features)
    text_head_module: nn.Module | None    # None where a head is a bare matrix (open_clip ViT / CLIP text)


@dataclass
class UnlockGroups:
    """Each tower's blocks as the model's own modules, input to output (what a cut runs through)."""

    image: list[nn.Module]
    text: list[nn.Module]


class ModelFamily:
    """One kind of open_clip model. Subclasses override what differs; see `clipsearch.families`."""

    name: ClassVar[str]
    # `pretrained` tags (not files) of this family come from a model hub (open_clip downloads them)
    hub_tags: ClassVar[bool] = False
    # with no pretrained weights the towers are still pretrained (only the heads start random), so a
    # fine-tune should be gentle on the towers; False: no weights at all means every weight is random
    pretrained_towers_without_weights: ClassVar[bool] = False
    # the projection heads always train as their own parameter group (head lr, feature dropout, CCA
    # start), even in a plain full fine-tune; False: only when blocks are locked or unlocked
    heads_apart: ClassVar[bool] = False
    # the frozen front of each tower can be run once and cached for fine-tuning (`offline.finetune.features`,
    # which runs a timm trunk's blocks and a Hugging Face encoder's layers: needs `unlock_groups`)
    feature_cache: ClassVar[bool] = False

    def builds(self, model_name: str) -> bool:
        """Whether `load_model(model_name)` creates its model through this family."""
        raise NotImplementedError

    def owns(self, model: nn.Module) -> bool:
        """Whether `model` (already built) has the towers this family knows how to take apart."""
        raise NotImplementedError

    def register(self) -> None:
        """Make this family's model configs known to open_clip (idempotent)."""

    def transform_kwargs(self) -> dict[str, Any]:
        """Preprocessing arguments for `open_clip.create_model_and_transforms` (mean, std, interpolation)."""
        return {}

    def create(self, model_name: str, pretrained: str | None, device: torch.device) -> Built:
        """Build the model on `device` with `pretrained` (a tag, a resolved local file, or None)."""
        raise NotImplementedError

    def text_tower(self, model: nn.Module) -> TextTower | None:
        """What runs the text tower; None for one we have no fast path or export for."""
        return None

    def image_tower(self, model: nn.Module) -> ImageTower | None:
        """What runs the image tower; None for one we have no export for."""
        return None

    def tower_blocks(self, model: nn.Module) -> TowerBlocks:
        """The blocks and heads by parameter name; `UnknownTowerError` for a tower it cannot split."""
        raise UnknownTowerError(f"Cannot find the blocks of {type(model).__name__}")

    def unlock_groups(self, model: nn.Module) -> UnlockGroups:
        """The blocks as modules, for running a frozen part once (families with `feature_cache`)."""
        raise UnknownTowerError(f"{self.name} models have no cached-feature path")
