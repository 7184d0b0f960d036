"""Exporting open_clip's ViT image tower (`VisionTransformer`, e.g. ViT-B-32's) to ONNX.

torch's `nn.MultiheadAttention` takes its fused fast path (`aten::_native_multi_head_attention`)
under inference mode, which the TorchScript exporter cannot write, and when traced the slow path
bakes the sample's shape into Reshape constants. So while tracing, each block's attention is
swapped for an export twin with the same weights and arithmetic, and restored after:

- `attention`: the whole self-attention (QKV projection, softmax, weighted sum) as one onnxruntime
  `com.microsoft::Attention` node, bidirectional (no mask: every patch token sees every other);
- `plain`: standard ONNX ops only (`clipsearch.onnx.attention.ExportSelfAttention`, as the text tower's).

Either may then go through onnxruntime's transformer optimizer (model type `vit`: SkipLayerNorm,
BiasGelu and, for `plain`, attention fusion). On this 2-core machine the variants ran a batch-1
ViT-B-32 query within 5% of each other (85-89 ms, 99 ms unfused plain, against 130 ms for eager
torch, load ~2); `attention` comes first. Every file still has to pass the image tower's self-check
against torch before it is used (`clipsearch.onnx.image.build_onnx_image`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from clipsearch.onnx.attention import ExportOrtAttention, ExportSelfAttention

VIT_VARIANTS = ("attention", "plain")  # preference order


def vit_geometry(model: torch.nn.Module) -> tuple[int, int]:
    """(heads, width) of the model's ViT image tower, for the transformer optimizer."""
    visual = model.visual
    attn = visual.transformer.resblocks[0].attn
    return int(attn.num_heads), int(attn.embed_dim)


@contextlib.contextmanager
def export_attention(model: torch.nn.Module, variant: str) -> Iterator[None]:
    """While inside, each ViT block of `model.visual` runs `variant`'s export twin of its attention."""
    if variant not in VIT_VARIANTS:
        raise ValueError(f"unknown ViT export variant {variant!r} (one of {', '.join(VIT_VARIANTS)})")
    wrapper = (lambda mha: ExportOrtAttention(mha, causal=False)) if variant == "attention" else ExportSelfAttention
    blocks = list(model.visual.transformer.resblocks)
    originals = [b.attn for b in blocks]
    try:
        for b in blocks:
            if not isinstance(b.attn, torch.nn.MultiheadAttention):
                raise ValueError(f"a ViT block's attention is {type(b.attn).__name__}, not MultiheadAttention")
            b.attn = wrapper(b.attn)
        yield
    finally:
        for b, a in zip(blocks, originals):
            b.attn = a
