"""The narrow encoder contract every other part depends on.

`encode_texts(list[str]) -> float32 (n, d)` and `encode_images(list[PIL.Image]) -> float32 (n, d)`,
both L2-normalised, so a fake encoder with the same two methods can stand in for tests.

Fast text path: open_clip pads every caption to 77 tokens, but the CLIP text tower is causal and
pools at the end-of-text token, so positions after the longest real caption in a batch cannot change
the result. We run the tower only up to that length (`truncate_tokens`). The same holds for Hugging
Face text towers, which mask padding. `tests/test_encoder.py` checks equality with the full path.
"""

from __future__ import annotations

import os
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from PIL import Image

from clipsearch.models import LoadedModel


class TokenEncoder(Protocol):
    def encode_tokens(self, tokens: torch.Tensor) -> NDArray[np.float32]: ...


class PixelEncoder(Protocol):
    def encode_pixels(self, pixels: torch.Tensor) -> NDArray[np.float32]: ...


def text_backend_for(loaded: LoadedModel, choice: str, cache_dir: str | os.PathLike[str],
                     threads: int) -> TokenEncoder | None:
    """The text backend a `--text-backend` / `CLIPSEARCH_TEXT_BACKEND` choice gives: for "onnx" the
    ONNX Runtime export of the tower (cached in `cache_dir`, self-checked against torch), else None,
    which is the torch path; None (logged) too where the tower cannot be exported."""
    if choice != "onnx":
        return None
    from clipsearch.onnx_text import maybe_onnx_text

    return maybe_onnx_text(loaded, cache_dir, threads=threads)


def image_backend_for(loaded: LoadedModel, choice: str, cache_dir: str | os.PathLike[str],
                      threads: int) -> PixelEncoder | None:
    """The same for the image tower (`--image-backend` / `CLIPSEARCH_IMAGE_BACKEND`): ONNX Runtime
    for timm towers such as lit-effnet-minilm's, torch (None) for the rest."""
    if choice != "onnx":
        return None
    from clipsearch.onnx_image import maybe_onnx_image

    return maybe_onnx_image(loaded, cache_dir, threads=threads)


class Encoder(Protocol):
    dim: int

    def encode_texts(self, texts: Sequence[str]) -> NDArray[np.float32]: ...

    def encode_images(self, images: Sequence[Image.Image]) -> NDArray[np.float32]: ...


def truncate_tokens(tokens: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Drop the all-padding columns at the right end of a right-padded token batch."""
    real = (tokens != pad_id).any(dim=0).nonzero()
    length = int(real.max()) + 1 if real.numel() else 1
    return tokens[:, :length]


def _has_clip_text_tower(model: torch.nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("token_embedding", "positional_embedding", "transformer",
                                           "ln_final", "attn_mask")) \
        and getattr(model, "text_pool_type", "argmax") in ("argmax", "eos")


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


class ClipEncoder:
    """Batched, normalised encoding with an open_clip model (any tower types)."""

    def __init__(self, loaded: LoadedModel, batch_size: int = 64, fast_text: bool = True,
                 text_backend: "TokenEncoder | None" = None, image_backend: "PixelEncoder | None" = None):
        """`text_backend` / `image_backend`: an exported tower (`clipsearch.onnx_text.OnnxTextEncoder`,
        `clipsearch.onnx_image.OnnxImageEncoder`) that replaces the torch path; it must give the same
        embeddings (both self-check against torch on build)."""
        self.loaded = loaded
        self.text_backend = text_backend
        self.image_backend = image_backend
        self.model = loaded.model
        self.device = loaded.device
        self.batch_size = batch_size
        self.dim = loaded.identity.embed_dim
        self.fast_text = fast_text
        self._clip_text = _has_clip_text_tower(self.model)
        text = getattr(self.model, "text", None)
        # HF towers mask padding by pad_token_id; right-truncation is equally safe there.
        self._pad_id = int(getattr(getattr(text, "config", None), "pad_token_id", 0) or 0)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.loaded.tokenizer(list(texts))

    @torch.inference_mode()
    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.text_backend is not None:
            return torch.from_numpy(self.text_backend.encode_tokens(tokens))
        tokens = tokens.to(self.device)
        if self.fast_text:
            tokens = truncate_tokens(tokens, self._pad_id)
            if self._clip_text:
                feats = clip_encode_text_truncated(self.model, tokens)
                return F.normalize(feats.float(), dim=-1)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def encode_texts(self, texts: Sequence[str]) -> NDArray[np.float32]:
        out = [self.encode_tokens(self.tokenize(texts[i:i + self.batch_size])).cpu().numpy()
               for i in range(0, len(texts), self.batch_size)]
        return _concat(out, self.dim)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.image_backend is not None:
            return torch.from_numpy(self.image_backend.encode_pixels(pixels))
        feats = self.model.encode_image(pixels.to(self.device, non_blocking=True))
        return F.normalize(feats.float(), dim=-1)

    def encode_images(self, images: Sequence[Image.Image]) -> NDArray[np.float32]:
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = torch.stack([self.loaded.preprocess(im) for im in images[i:i + self.batch_size]])
            out.append(self.encode_pixels(pixels).cpu().numpy())
        return _concat(out, self.dim)


def _concat(parts: list[np.ndarray], dim: int) -> NDArray[np.float32]:
    if not parts:
        return np.zeros((0, dim), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
