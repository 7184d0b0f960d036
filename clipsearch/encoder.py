"""The narrow encoder contract every other part depends on, its torch implementation, and the one
place that picks each tower's runtime.

`encode_texts(list[str]) -> float32 (n, d)` and `encode_images(list[PIL.Image]) -> float32 (n, d)`,
both L2-normalised, so a fake encoder with the same two methods can stand in for tests.

`ClipEncoder` runs a loaded model in torch; a tower may instead run as an ONNX Runtime export
(`clipsearch.onnx`) or, for a ViT image tower on an AMX CPU, as a bf16 copy (`clipsearch.bf16`);
either must give the same embeddings. `build_encoder` (and `text_backend_for` /
`image_backend_for`, what the service and `offline embed` call per tower) decide that in one place,
`tower_backend`. The torch text path runs only up to the longest real token of a batch
(`clipsearch.towers`); `tests/test_encoder.py` checks equality with the full 77-token path.
"""

from __future__ import annotations

import os
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from PIL import Image

from clipsearch.bf16 import maybe_bf16_image, pays_in_bf16
from clipsearch.families import family_of
from clipsearch.models import LoadedModel
from clipsearch.onnx import OnnxTowerEncoder, maybe_onnx_image, maybe_onnx_text
from clipsearch.onnx.runtime import Runtime, Tower
from clipsearch.towers import clip_encode_text_truncated, text_pad_id, truncate_tokens

__all__ = ["ClipEncoder", "Encoder", "PixelEncoder", "Runtime", "TokenEncoder", "build_encoder",
           "image_backend_for", "image_session_threads", "takes_pixels", "text_backend_for", "tower_backend"]


class TokenEncoder(Protocol):
    def encode_tokens(self, tokens: torch.Tensor) -> NDArray[np.float32]: ...


class PixelEncoder(Protocol):
    def encode_pixels(self, pixels: torch.Tensor) -> NDArray[np.float32]: ...


class Encoder(Protocol):
    dim: int

    def encode_texts(self, texts: Sequence[str]) -> NDArray[np.float32]: ...

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """One image's model input [3, H, W] (the model's own preprocess), for `encode_pixels`."""
        return self.loaded.preprocess(image)

    def encode_images(self, images: Sequence[Image.Image], tta: bool = True) -> NDArray[np.float32]: ...


def takes_pixels(encoder: Encoder) -> bool:
    """Whether `encoder` also takes preprocessed pixels (`preprocess_image` one image, `encode_pixels`
    a stacked batch), as `ClipEncoder` does, so a service can decode and preprocess uploads in
    parallel and share one forward pass. The contract's one optional capability, read here and only
    here: a fake with the two contract methods alone does not."""
    return callable(getattr(encoder, "preprocess_image", None)) and callable(getattr(encoder, "encode_pixels", None))


def image_session_threads(encoder: Encoder) -> int | None:
    """The intra-op threads of the session that runs `encoder`'s image tower (ONNX or bf16), or None
    where it runs in torch (or is a fake)."""
    threads = getattr(getattr(encoder, "image_backend", None), "threads", None)
    return int(threads) if threads else None


def tower_backend(loaded: LoadedModel, tower: Tower, runtime: Runtime,
                  cache_dir: str | os.PathLike[str] | None, threads: int) -> TokenEncoder | PixelEncoder | None:
    """What runs `tower` instead of fp32 eager torch (None = that torch path):
    - "onnx": the ONNX Runtime export (cached in `cache_dir`, self-checked against torch);
    - "bf16" (image only): the bf16 copy of the image tower (`clipsearch.bf16`, self-checked), and
      where that fails or disagrees, the "onnx" path;
    - "auto" (the default): "bf16" for a ViT image tower on a CPU with AMX-BF16 (`pays_in_bf16`),
      otherwise "onnx";
    - "torch": None.
    A tower that cannot be exported, or whose export fails its check, falls back (logged) as above."""
    if runtime == "torch":
        return None
    if tower == "image" and (runtime == "bf16" or (runtime == "auto" and pays_in_bf16(loaded))):
        fast = maybe_bf16_image(loaded, threads)
        if fast is not None:
            return fast
    if cache_dir is None:
        raise ValueError(f"the ONNX {tower} tower needs a cache_dir for its export")
    maybe = maybe_onnx_text if tower == "text" else maybe_onnx_image
    return maybe(loaded, cache_dir, threads=threads)


def text_backend_for(loaded: LoadedModel, choice: Runtime, cache_dir: str | os.PathLike[str] | None,
                     threads: int) -> TokenEncoder | None:
    """The text backend a `--text-backend` / `CLIPSEARCH_TEXT_BACKEND` choice gives (`tower_backend`)."""
    return tower_backend(loaded, "text", choice, cache_dir, threads)


def image_backend_for(loaded: LoadedModel, choice: Runtime, cache_dir: str | os.PathLike[str] | None,
                      threads: int) -> PixelEncoder | None:
    """The same for the image tower (`--image-backend` / `CLIPSEARCH_IMAGE_BACKEND`): by default
    ("auto") the bf16 tower for a ViT such as ViT-B-32's on an AMX CPU, ONNX Runtime for timm towers
    such as lit-effnet-minilm's and for ViTs elsewhere, torch for the rest."""
    return tower_backend(loaded, "image", choice, cache_dir, threads)


def build_encoder(loaded: LoadedModel, text: Runtime | None = "torch", image: Runtime | None = "torch",
                  cache_dir: str | os.PathLike[str] | None = None, threads: int = 1, batch_size: int = 64,
                  fast_text: bool = True, image_threads: int | None = None) -> ClipEncoder:
    """The one way to make an encoder: one for `loaded` with each tower on the runtime asked for,
    where it can run there (`tower_backend`); `cache_dir` holds the ONNX exports and is needed when
    either asks for "onnx". None for a tower nobody will use here (an ingest of a folder without
    captions never encodes a text): no session is built for it (it would run in torch).
    `image_threads`: the image session's intra-op threads, where they differ from `threads` (a
    service runs a lone image query on every core)."""
    return ClipEncoder(loaded, batch_size=batch_size, fast_text=fast_text,
                       text_backend=None if text is None else text_backend_for(loaded, text, cache_dir, threads),
                       image_backend=None if image is None else image_backend_for(loaded, image, cache_dir,
                                                                                   image_threads or threads))


class ClipEncoder:
    """Batched, normalised encoding with an open_clip model (any tower types)."""

    def __init__(self, loaded: LoadedModel, batch_size: int = 64, fast_text: bool = True,
                 text_backend: "TokenEncoder | None" = None, image_backend: "PixelEncoder | None" = None):
        """`text_backend` / `image_backend`: an exported tower (`clipsearch.onnx.OnnxTowerEncoder`,
        see `tower_backend`) that replaces the torch path; it must give the same embeddings (each
        self-checks against torch on build)."""
        self.loaded = loaded
        self.text_backend = text_backend
        self.image_backend = image_backend
        self.model = loaded.model
        self.device = loaded.device
        self.batch_size = batch_size
        self.dim = loaded.identity.embed_dim
        self.fast_text = fast_text
        # open_clip's own CLIP text tower runs truncated here; others get the truncated tokens
        self._clip_text = family_of(self.model).text_tower(self.model) == "clip"
        # HF towers mask padding by pad_token_id; right-truncation is equally safe there.
        self._pad_id = text_pad_id(self.model)

    @property
    def released(self) -> set[Tower]:
        """Towers of this model whose torch weights were freed (kept on the model, for every encoder)."""
        return self.loaded.extra.setdefault("released_towers", set())

    def release_torch_towers(self, image: bool = False, text: bool = False) -> list[Tower]:
        """Free the weights of torch towers this encoder will not run again: their parameters move to
        the meta device (no storage), the modules stay. A tower served by a backend (ONNX Runtime, the
        bf16 copy) never runs in torch, and an ingest that encodes no caption never needs the text
        tower; ViT-B-32's fp32 towers are ~600 MB. The model changes in place, so only a caller that owns
        it may ask (the `ingest` command loads its own). The image tower is `visual`, the text tower
        every other child of the model. Returns the towers released; a released tower's torch path
        raises RuntimeError."""
        done: list[Tower] = []
        for tower, wanted in (("image", image), ("text", text)):
            if not wanted or tower in self.released:
                continue
            for name, child in self.model.named_children():
                if (name == "visual") == (tower == "image"):
                    child.to("meta")
            self.released.add(tower)
            done.append(tower)
        return done

    def _torch_tower(self, tower: Tower) -> torch.nn.Module:
        if tower in self.released:
            raise RuntimeError(f"the torch {tower} tower of {self.loaded.identity.model} was released "
                               "(release_torch_towers); load the model again to run it")
        return self.model

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.loaded.tokenizer(list(texts))

    @torch.inference_mode()
    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.text_backend is not None:
            return torch.from_numpy(self.text_backend.encode_tokens(tokens))
        model = self._torch_tower("text")
        tokens = tokens.to(self.device)
        if self.fast_text:
            tokens = truncate_tokens(tokens, self._pad_id)
            if self._clip_text:
                feats = clip_encode_text_truncated(model, tokens)
                return F.normalize(feats.float(), dim=-1)
        return F.normalize(model.encode_text(tokens).float(), dim=-1)

    def encode_texts(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """In batches of `batch_size`, texts of similar length together (a batch runs to its longest
        text, so sorting cuts the padding; the order of the result is the order given)."""
        if len(texts) <= self.batch_size:
            return _concat([self.encode_tokens(self.tokenize(texts)).cpu().numpy()] if texts else [], self.dim)
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = [self.encode_tokens(self.tokenize([texts[j] for j in order[i:i + self.batch_size]])).cpu().numpy()
               for i in range(0, len(texts), self.batch_size)]
        flat = _concat(out, self.dim)
        result = np.empty_like(flat)
        result[order] = flat
        return result

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor, tta: bool = True) -> torch.Tensor:
        """Normalised image embeddings of preprocessed pixels [n, 3, H, W]. With the model's
        `image_tta` "mirror", each is the normalised mean of the image's and its horizontal mirror's
        embeddings (one forward of 2n). The mirror is the flipped preprocessed tensor, which is the
        preprocessed mirror image: resize and normalisation are symmetric, and so is the centre crop
        except that an odd number of cropped columns shifts it by one pixel.

        `tta=False` embeds each image once, plain, whatever the model's `image_tta`: what an image
        *query* does (test-time augmentation belongs to the images a collection stores, paid once at
        ingest; a query that paid it would cost two forwards for every search)."""
        if tta and self.loaded.identity.image_tta == "mirror":
            n = len(pixels)
            both = self._forward_pixels(torch.cat([pixels, pixels.flip(-1)]))
            return F.normalize(both[:n] + both[n:], dim=-1)
        return self._forward_pixels(pixels)

    def _forward_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.image_backend is not None:
            return torch.from_numpy(self.image_backend.encode_pixels(pixels))
        feats = self._torch_tower("image").encode_image(pixels.to(self.device, non_blocking=True))
        return F.normalize(feats.float(), dim=-1)

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """One image's model input [3, H, W] (the model's own preprocess), for `encode_pixels`."""
        return self.loaded.preprocess(image)

    def encode_images(self, images: Sequence[Image.Image], tta: bool = True) -> NDArray[np.float32]:
        """Like `encode_pixels` (`tta` too), from PIL images, in batches of `batch_size`."""
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = torch.stack([self.loaded.preprocess(im) for im in images[i:i + self.batch_size]])
            out.append(self.encode_pixels(pixels, tta=tta).cpu().numpy())
        return _concat(out, self.dim)


def _concat(parts: list[np.ndarray], dim: int) -> NDArray[np.float32]:
    if not parts:
        return np.zeros((0, dim), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
