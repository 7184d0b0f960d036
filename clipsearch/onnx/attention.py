"""Export twins of open_clip's `nn.MultiheadAttention` self-attention, swapped in while tracing a
text tower (causal) or a ViT image tower (bidirectional); same weights, same arithmetic.

- `ExportSelfAttention`: standard ONNX ops only, batch and length kept dynamic;
- `ExportOrtAttention`: the whole self-attention (QKV projection, optional causal mask, softmax,
  weighted sum) as one onnxruntime `com.microsoft::Attention` node: a dozen nodes fewer per layer,
  which is what batch-1 latency is made of.
"""

from __future__ import annotations

import torch

__all__ = ["ExportOrtAttention", "ExportSelfAttention"]


class ExportSelfAttention(torch.nn.Module):
    """nn.MultiheadAttention's self-attention, written so the tracer keeps batch and length dynamic.

    torch's own MHA bakes the sample's (length, batch*heads) into Reshape constants when traced, so
    the exported graph would only accept the sample shape. Same weights, same arithmetic.
    """

    def __init__(self, mha: torch.nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            raise ValueError("only packed-QKV self-attention can be exported")
        self.mha = mha
        self.heads = int(mha.num_heads)
        self.head_dim = int(mha.embed_dim // mha.num_heads)
        self.batch_first = bool(mha.batch_first)

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None):
        x = query if self.batch_first else query.transpose(0, 1)  # [B, L, D]
        qkv = torch.nn.functional.linear(x, self.mha.in_proj_weight, self.mha.in_proj_bias)
        qkv = qkv.reshape(x.shape[0], x.shape[1], 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, H, L, Dh]
        scores = torch.matmul(q * (self.head_dim ** -0.5), k.transpose(-1, -2))
        if attn_mask is not None:
            scores = scores + attn_mask
        out = torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2).flatten(2)  # [B, L, D]
        out = self.mha.out_proj(out)
        return (out if self.batch_first else out.transpose(0, 1)), None


class _OrtAttention(torch.autograd.Function):
    """Packed-QKV self-attention that exports as one com.microsoft `Attention` node (`unidirectional`
    = causal); in torch (while tracing) it computes the same thing the plain way."""

    @staticmethod
    def forward(ctx, x, weight_t, bias, heads: int, causal: bool):  # x [B, L, D], weight_t [D, 3D]
        b, n, d = x.shape
        qkv = (x @ weight_t + bias).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = (q * (d // heads) ** -0.5) @ k.transpose(-1, -2)
        if causal:
            mask = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)

    @staticmethod
    def symbolic(g, x, weight_t, bias, heads: int, causal: bool):
        out = g.op("com.microsoft::Attention", x, weight_t, bias, num_heads_i=heads,
                   unidirectional_i=int(causal))
        out.setType(x.type())
        return out


class ExportOrtAttention(ExportSelfAttention):
    """The attention as one onnxruntime `Attention` node: `causal` for a text tower (the model's mask
    must be the causal one, checked by the caller), bidirectional (no mask at all) for a ViT block."""

    def __init__(self, mha: torch.nn.MultiheadAttention, causal: bool):
        super().__init__(mha)
        self.causal = causal

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None):
        if not self.causal and attn_mask is not None:
            raise ValueError("the bidirectional Attention export takes no attention mask")
        x = query if self.batch_first else query.transpose(0, 1)
        out = _OrtAttention.apply(x, self.mha.in_proj_weight.t(), self.mha.in_proj_bias, self.heads, self.causal)
        out = self.mha.out_proj(out)
        return (out if self.batch_first else out.transpose(0, 1)), None
