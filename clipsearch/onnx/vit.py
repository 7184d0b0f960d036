"""Exporting open_clip's ViT image tower (`VisionTransformer`, e.g. ViT-B-32's) to ONNX.

torch's `nn.MultiheadAttention` takes its fused fast path (`aten::_native_multi_head_attention`)
under inference mode, which the TorchScript exporter cannot write, and when traced the slow path
bakes the sample's shape into Reshape constants. So while tracing, each block's attention is
swapped for an export twin with the same weights and arithmetic, and restored after:

- `attention`: the whole self-attention (QKV projection, softmax, weighted sum) as one onnxruntime
  `com.microsoft::Attention` node, bidirectional (no mask: every patch token sees every other);
- `plain`: standard ONNX ops only (the text tower's `_ExportSelfAttention`).

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

from clipsearch.onnx.text import _ExportSelfAttention

VIT_VARIANTS = ("attention", "plain")  # preference order


class _OrtSelfAttention(torch.autograd.Function):
    """Packed-QKV bidirectional self-attention that exports as one com.microsoft `Attention` node;
    in torch (while tracing) it computes the same thing the plain way."""

    @staticmethod
    def forward(ctx, x, weight_t, bias, heads: int):  # x [B, L, D], weight_t [D, 3D]
        b, n, d = x.shape
        qkv = (x @ weight_t + bias).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = (q * (d // heads) ** -0.5) @ k.transpose(-1, -2)
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)

    @staticmethod
    def symbolic(g, x, weight_t, bias, heads: int):
        out = g.op("com.microsoft::Attention", x, weight_t, bias, num_heads_i=heads, unidirectional_i=0)
        out.setType(x.type())
        return out


class _ExportOrtSelfAttention(_ExportSelfAttention):
    """The ViT block's attention as one onnxruntime `Attention` node (no mask)."""

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None):
        if attn_mask is not None:
            raise ValueError("the fused Attention export of a ViT block takes no attention mask")
        x = query if self.batch_first else query.transpose(0, 1)
        out = _OrtSelfAttention.apply(x, self.mha.in_proj_weight.t(), self.mha.in_proj_bias, self.heads)
        out = self.mha.out_proj(out)
        return (out if self.batch_first else out.transpose(0, 1)), None


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
    wrapper = _ExportOrtSelfAttention if variant == "attention" else _ExportSelfAttention
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
