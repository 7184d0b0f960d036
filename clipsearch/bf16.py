"""The bf16 image tower: a ViT image tower's weights and activations in bfloat16, on torch's oneDNN
kernels, for CPUs with AMX-BF16 tiles (Intel Sapphire Rapids and later).

A ViT tower at batch 32 is a chain of large GEMMs, and fp32 GEMM is as fast in ONNX Runtime's MLAS
as in torch's MKL, so the ONNX export only removes per-op overhead (parity at batch 32; BENCHMARKS.md
7.1). With AMX, a bf16 GEMM runs ~3x the fp32 one here (1600x768 @ 768x3072 on 2 threads: 14.6 vs
47.4 ms), and a whole ViT-B-32 forward 2.6x at batch 32 and 2.8x at batch 1 against eager fp32, at a
minimum cosine of 0.99995 to the fp32 embedding (random weights). EfficientNet-Lite0 (lit-effnet-
minilm) gains nothing this way (its depthwise convolutions are not GEMMs; cosine 0.998, which the
self-check rejects), so only ViT towers are put here by default.

Same rules as the ONNX towers (`clipsearch.onnx.runtime`): the tower ends in the L2-normalised
embedding, and before it is used it must match torch's fp32 `encode_image` (cosine >= 0.9999) on a
few random pixel batches; `maybe_bf16_image` returns None (logged) on any failure, so callers keep
the next path (`clipsearch.encoder.tower_backend`).
"""

from __future__ import annotations

import copy
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from numpy.typing import NDArray

from clipsearch.families import family_of
from clipsearch.models import LoadedModel
from clipsearch.onnx.image import check_pixels
from clipsearch.onnx.runtime import self_check
from clipsearch.towers import l2_normalize

__all__ = ["Bf16ImageTower", "PackedLinear", "PackedSelfAttention", "amx_bf16", "build_bf16_image",
           "maybe_bf16_image", "pack_vit", "pays_in_bf16"]

log = logging.getLogger("clipsearch.bf16_image")


def amx_bf16() -> bool:
    """True where this CPU has AMX tiles that torch can use (bf16 GEMMs then run ~3x fp32)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.cpu._is_amx_tile_supported()
                    and torch.cpu._init_amx())
    except Exception:  # noqa: BLE001 - an older torch without these probes: no AMX path
        return False


def pays_in_bf16(loaded: LoadedModel) -> bool:
    """The default rule: a ViT image tower, on the CPU, with AMX-BF16."""
    return (loaded.device.type == "cpu" and family_of(loaded.model).image_tower(loaded.model) == "vit"
            and amx_bf16())


def _packed(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` reordered once into oneDNN's blocked layout (None where this torch cannot): an unpacked
    bf16 weight is reordered on every call, which was ~40% of a batch-1 ViT-B-32 linear here."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    except Exception:  # noqa: BLE001 - no oneDNN linear ops: the plain bf16 linear still runs
        return None


class PackedLinear(torch.nn.Module):
    """`nn.Linear` with its bf16 weight packed once for oneDNN (same arithmetic as `F.linear`)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight = linear.weight.detach()
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.packed = _packed(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return torch.nn.functional.linear(x, self.weight, self.bias)


class PackedSelfAttention(torch.nn.Module):
    """A ViT block's `nn.MultiheadAttention` (packed QKV, no mask: every patch sees every other) as
    two packed linears around `scaled_dot_product_attention`; called as the block calls its `attn`."""

    def __init__(self, mha: torch.nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            raise ValueError("only packed-QKV self-attention runs in the bf16 tower")
        qkv = torch.nn.Linear(mha.embed_dim, 3 * mha.embed_dim, bias=mha.in_proj_bias is not None)
        qkv.weight, qkv.bias = mha.in_proj_weight, mha.in_proj_bias
        self.qkv = PackedLinear(qkv)
        self.out = PackedLinear(mha.out_proj)
        self.heads = int(mha.num_heads)
        self.batch_first = bool(mha.batch_first)

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None):
        if attn_mask is not None:
            raise ValueError("the bf16 ViT attention takes no attention mask")
        x = query if self.batch_first else query.transpose(0, 1)  # [B, L, D]
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        out = self.out(out)
        return (out if self.batch_first else out.transpose(0, 1)), None


def pack_vit(visual: torch.nn.Module) -> torch.nn.Module:
    """In place: a bf16 ViT tower's attentions and linears swapped for their packed twins."""
    for block in visual.transformer.resblocks:
        if isinstance(block.attn, torch.nn.MultiheadAttention):
            block.attn = PackedSelfAttention(block.attn)
    for parent in list(visual.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, PackedLinear(child))
    return visual


class Bf16ImageTower:
    """A bf16 copy of the model's image tower: pixels [n, 3, H, W] -> float32 (n, d), L2-normalised.

    The copy is the model's `visual` (open_clip's `encode_image` is `visual(pixels)`), so the fp32 model
    stays as it was. Forwards run on threads of its own, `cores // threads` of them (one with the
    default `threads` = every core), each with `threads` torch intra-op threads: each calling thread
    would otherwise get its own OpenMP team, and in the service, where successive image batches land
    on different worker threads, an idle team's spinning threads took the cores from the busy one
    (a lone query at 112-147 ms instead of 48-58 ms, in 2 of 4 runs)."""

    tower = "image"
    label = "bf16"

    def __init__(self, model: torch.nn.Module, threads: int = 1):
        self.visual = copy.deepcopy(model.visual).to(torch.bfloat16).eval()
        if family_of(model).image_tower(model) == "vit":
            pack_vit(self.visual)
        self.threads = max(1, int(threads))
        self.self_check_cos: float | None = None
        runners = max(1, (os.cpu_count() or 1) // self.threads)
        self._runner = ThreadPoolExecutor(runners, thread_name_prefix="bf16-image",
                                          initializer=torch.set_num_threads, initargs=(self.threads,))

    def encode(self, pixels: torch.Tensor | np.ndarray) -> NDArray[np.float32]:
        x = torch.as_tensor(pixels)
        if x.ndim != 4:
            raise ValueError(f"expected pixels [batch, 3, H, W], got shape {tuple(x.shape)}")
        return self._runner.submit(self._forward, x).result()

    @torch.inference_mode()
    def _forward(self, x: torch.Tensor) -> NDArray[np.float32]:
        out = l2_normalize(self.visual(x.to(torch.bfloat16)).float()).numpy()
        return np.ascontiguousarray(out, dtype=np.float32)

    def encode_pixels(self, pixels: torch.Tensor | np.ndarray) -> NDArray[np.float32]:
        return self.encode(pixels)


def build_bf16_image(loaded: LoadedModel, threads: int = 1) -> Bf16ImageTower:
    """The bf16 tower of `loaded`, self-checked against its fp32 `encode_image` (RuntimeError below
    cosine 0.9999)."""
    if loaded.device.type != "cpu":
        raise ValueError("the bf16 image tower is for the CPU (on a GPU, autocast does this)")
    enc = Bf16ImageTower(loaded.model, threads)
    enc.self_check_cos = self_check(enc, loaded.model.encode_image, check_pixels(loaded.model))
    log.info("bf16 image: using the bf16 tower (min cosine vs fp32 %.6f)", enc.self_check_cos)
    return enc


def maybe_bf16_image(loaded: LoadedModel, threads: int = 1) -> Bf16ImageTower | None:
    """`build_bf16_image`, or None (logged) when it fails or changes the result."""
    try:
        return build_bf16_image(loaded, threads)
    except Exception as exc:  # a tower that fails or disagrees is not served
        log.warning("bf16 image: not used for %s (%s: %s)", loaded.identity.model, type(exc).__name__, exc)
        return None
