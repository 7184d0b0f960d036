"""Torch-only helpers that run parts of an open_clip tower: no ONNX, no model loading, no families.

The torch encoder (`clipsearch.encoder`), the ONNX exports (`clipsearch.onnx`) and the model families
(`clipsearch.families`) all build on these, so none of them has to import another for them.

Fast text path: open_clip pads every caption to 77 tokens, but the CLIP text tower is causal and
pools at the end-of-text token, so positions after the longest real caption in a batch cannot change
the result. `truncate_tokens` drops those columns and `clip_encode_text_truncated` runs the tower on
what is left. The same truncation holds for Hugging Face text towers, which mask padding.
"""

from __future__ import annotations

import torch


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """`x / ||x||` over the last axis, a zero row staying zero: the form every exported tower ends with."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def truncate_tokens(tokens: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Drop the all-padding columns at the right end of a right-padded token batch."""
    real = (tokens != pad_id).any(dim=0).nonzero()
    length = int(real.max()) + 1 if real.numel() else 1
    return tokens[:, :length]


def text_pad_id(model: torch.nn.Module) -> int:
    """The id the tokenizer pads with: Hugging Face towers name it in their config, open_clip CLIP uses 0."""
    return int(getattr(getattr(getattr(model, "text", None), "config", None), "pad_token_id", 0) or 0)


def image_size(model: torch.nn.Module) -> tuple[int, int]:
    """(height, width) the image tower takes."""
    size = getattr(model.visual, "image_size", 224)
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def clip_encode_text_truncated(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip `CLIP.encode_text` over a truncated token batch (un-normalised features)."""
    length = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    attn_mask = model.attn_mask[:length, :length] if model.attn_mask is not None else None
    x = model.transformer(x, attn_mask=attn_mask)
    x = model.ln_final(x)
    if model.text_pool_type == "argmax":
        # the end-of-text token has the highest id in open_clip's CLIP vocabulary
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    else:
        idx = (tokens == model.text_eos_id).int().argmax(dim=-1)
        x = x[torch.arange(x.shape[0], device=x.device), idx]
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x
