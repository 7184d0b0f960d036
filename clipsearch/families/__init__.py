"""Model families behind one small registry.

`family_for(model_name)` is the family that builds a model by name (`clipsearch.models.load_model`
asks it); `family_of(model)` the family that knows the towers of a model already built (the encoder,
the ONNX exports and fine-tuning ask it). Both walk `FAMILIES` in order and take the first that
answers yes, so specific families come first and open_clip's catch-all last.

Adding a family (say SigLIP or MobileCLIP) is one new file here with a `ModelFamily` subclass
(see `base.py`; `lit.py` is a complete example) and its instance in `FAMILIES`.
"""

from __future__ import annotations

from torch import nn

from clipsearch.families.base import (Built, ImageTower, ModelFamily, TextTower, TowerBlocks, UnknownTowerError,
                                      UnlockGroups)
from clipsearch.families.lit import LitFamily
from clipsearch.families.openclip import OpenClipFamily

__all__ = ["FAMILIES", "Built", "ImageTower", "ModelFamily", "TextTower", "TowerBlocks", "UnknownTowerError",
           "UnlockGroups", "family_for", "family_of"]

FAMILIES: tuple[ModelFamily, ...] = (LitFamily(), OpenClipFamily())


def family_for(model_name: str) -> ModelFamily:
    """The family that builds `model_name`."""
    return next(f for f in FAMILIES if f.builds(model_name))


def family_of(model: nn.Module) -> ModelFamily:
    """The family whose towers `model` has."""
    return next(f for f in FAMILIES if f.owns(model))
