"""open_clip's own architectures (ViT-B-32, convnext_*, roberta-ViT-B-32, the tiny test configs ...).

The catch-all family: it builds whatever `open_clip.list_models()` names and the registry asks it
last. Its towers are whatever open_clip's tower builders made, so each question is answered from the
tower's class: `CLIP` keeps its causal text transformer on the model itself, `CustomTextCLIP` puts
a `TextTransformer` or an `HFTextEncoder` under `.text`; the image tower is a `VisionTransformer`, a
`TimmModel` or a `ModifiedResNet`. Blocks are known for the ViT image tower and both open_clip text
transformers; everything else fine-tunes whole.
"""

from __future__ import annotations

import torch
from torch import nn

from clipsearch.families.base import Built, ImageTower, ModelFamily, TextTower, TowerBlocks, UnknownTowerError


class OpenClipFamily(ModelFamily):
    name = "openclip"
    hub_tags = True

    def builds(self, model_name: str) -> bool:
        return True  # the catch-all; load_model has already checked open_clip.list_models()

    def owns(self, model: nn.Module) -> bool:
        return True

    def create(self, model_name: str, pretrained: str | None, device: torch.device) -> Built:
        import open_clip

        model, preprocess_train, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device, weights_only=True, **self.transform_kwargs())
        return model, preprocess_train, preprocess, open_clip.get_tokenizer(model_name)

    def text_tower(self, model: nn.Module) -> TextTower | None:
        from open_clip.hf_model import HFTextEncoder
        from open_clip.model import CLIP

        if isinstance(model, CLIP) and getattr(model, "text_pool_type", "argmax") in ("argmax", "eos"):
            return "clip"
        text = getattr(model, "text", None)
        # HF towers mask by config.pad_token_id: without one the padding could not be dropped exactly
        if isinstance(text, HFTextEncoder) and getattr(text.config, "pad_token_id", None) is not None:
            return "hf"
        return None

    def image_tower(self, model: nn.Module) -> ImageTower | None:
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer

        visual = getattr(model, "visual", None)
        if isinstance(visual, TimmModel):
            return "timm"
        if isinstance(visual, VisionTransformer):
            return "vit"
        return None

    def tower_blocks(self, model: nn.Module) -> TowerBlocks:
        """ViT image tower: patch embedding (+ class/positional embeddings, ln_pre), then one block per
        resblock, ln_post joining the last; the text transformer the same way (embeddings, resblocks,
        ln_final), on the model itself for `CLIP` or under `.text` for `CustomTextCLIP`."""
        from open_clip.transformer import TextTransformer

        visual, text = getattr(model, "visual", None), getattr(model, "text", None)
        if self.image_tower(model) != "vit":
            raise UnknownTowerError(f"Cannot find the blocks of {type(visual).__name__}")
        n_img = len(visual.transformer.resblocks)
        img_pre = [["visual.conv1", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre"]]
        img_pre += [[f"visual.transformer.resblocks.{i}"] for i in range(n_img)]
        img_pre[-1] += ["visual.ln_post"]
        if text is not None:  # CustomTextCLIP with an open_clip TextTransformer
            if not isinstance(text, TextTransformer):
                raise UnknownTowerError(f"Cannot find the blocks of text tower {type(text).__name__}")
            n_txt = len(text.transformer.resblocks)
            txt_pre = [["text.token_embedding", "text.positional_embedding"]]
            txt_pre += [[f"text.transformer.resblocks.{i}"] for i in range(n_txt)]
            txt_pre[-1] += ["text.ln_final"]
            txt_head = ["text.text_projection"]
        else:
            n_txt = len(model.transformer.resblocks)
            txt_pre = [["token_embedding", "positional_embedding"]]
            txt_pre += [[f"transformer.resblocks.{i}"] for i in range(n_txt)]
            txt_pre[-1] += ["ln_final"]
            txt_head = ["text_projection"]
        return TowerBlocks(img_pre, txt_pre, ["visual.proj"], txt_head, None, None)
