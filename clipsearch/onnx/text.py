"""The ONNX Runtime text tower for open_clip text towers: the small-batch query fast path.

At batch 1 the CLIP text tower is bound by per-op overhead and weight bytes, not FLOPs, so running
only the real tokens (`truncate_tokens`) is not enough on its own; ONNX Runtime removes most of the
per-op overhead. The exported graph is the *truncated* tower: token ids `[batch, length]` with both
axes dynamic -> L2-normalised embedding, the end-of-text (argmax / eos) pooling inside the graph, so
`encode_tokens` drops the all-padding columns itself and the result equals open_clip's full
77-token `encode_text` (`tests/test_onnx_text.py` checks it; every session also passes a self-check
against torch before it is used).

Two graph variants: `attention` writes each block's causal self-attention as one onnxruntime
`com.microsoft::Attention` node (unidirectional), `plain` uses standard ONNX ops only; either may
then go through onnxruntime's transformer optimizer (SkipLayerNorm/BiasGelu fusion, `.fused`).

Hugging Face text towers (open_clip `HFTextEncoder`, e.g. all-MiniLM-L6-v2 in lit-effnet-minilm)
export the same way: token ids `[batch, length]` -> normalised embedding, the attention mask
(`tokens != pad_token_id`) and the pooling computed inside the graph, so dropping all-padding columns
is again exact (padding is masked out of attention and pooling). Variants `sdpa` (torch's
scaled_dot_product_attention, decomposed by the exporter; the `bert` optimizer fuses SkipLayerNorm
and BiasGelu) and `eager` (transformers' eager attention, which it also fuses into `Attention` +
`EmbedLayerNormalization`). `sdpa` comes first: on this 2-core machine all four files ran a batch-1
MiniLM query in 9-11 ms (1 thread, load ~3), but the fused `Attention` was ~20-40% slower at batch 8.
Files: `<cache_dir>/<key>.<variant>[.fused].onnx`, `key` = `clipsearch.onnx.runtime.cache_key`
(export format, torch version, model identity or, for random weights, the text-tower weights), each
written atomically. The session, the self-check and the fallback are `clipsearch.onnx.runtime`'s.

Only fp32: dynamic int8 loses ~1e-3 of cosine and its effect on retrieval recall has to be measured
on trained weights first (see benchmarks/README.md).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from clipsearch.families import TextTower, family_of
from clipsearch.manifest import save_with
from clipsearch.models import LoadedModel
from clipsearch.onnx.attention import ExportOrtAttention, ExportSelfAttention
from clipsearch.onnx.runtime import (INPUTS, OUTPUT, OnnxTowerEncoder, cache_key, export_module, maybe_onnx,
                                     self_check, tower_log)
from clipsearch.towers import clip_encode_text_truncated, l2_normalize, text_pad_id

log = tower_log("text")

INPUT = INPUTS["text"][0]


def text_tower_kind(model: torch.nn.Module) -> TextTower | None:
    """"clip", "hf", or None when the model's text tower cannot be exported (its family says which)."""
    return family_of(model).text_tower(model)


def _is_causal_mask(mask: torch.Tensor | None) -> bool:
    if mask is None or mask.dim() != 2:
        return False
    upper = torch.ones_like(mask, dtype=torch.bool).triu(1)
    return bool(torch.isneginf(mask[upper]).all()) and bool((mask[~upper] == 0).all())


class _TruncatedTextTower(torch.nn.Module):
    """tokens [B, L] (right-truncated) -> normalised embedding [B, D]; what gets exported."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return l2_normalize(clip_encode_text_truncated(self.model, tokens).float())


class _HFTextTower(torch.nn.Module):
    """tokens [B, L] -> normalised embedding [B, D] through open_clip's `HFTextEncoder`.

    `HFTextEncoder.forward` itself builds the mask as `tokens != pad_token_id`, runs the
    transformer with it and pools over the real tokens only, so the traced graph holds all of that
    and any right-truncation of the padding gives the same result as the full padded length.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.model.text(tokens).float())


def export_text_tower(model: torch.nn.Module, path: str | os.PathLike[str], ort_attention: bool = True) -> Path:
    """Export the truncated text tower (fp32, dynamic batch and length) to `path`, atomically.

    `ort_attention`: emit onnxruntime's fused `Attention` op (causal) instead of plain ONNX ops; only
    when the model's mask is the plain causal mask (what `unidirectional=1` implements).
    """
    path = Path(path)
    if ort_attention and not _is_causal_mask(getattr(model, "attn_mask", None)):
        raise ValueError("the fused Attention export needs the standard causal text mask")
    wrapper = (lambda mha: ExportOrtAttention(mha, causal=True)) if ort_attention else ExportSelfAttention
    tower = _TruncatedTextTower(model).eval().float()
    sample = torch.ones(2, 5, dtype=torch.long)
    sample[:, -1] = int(getattr(model, "vocab_size", 49408)) - 1  # an eot-like id for argmax pooling

    # swap each block's MHA for the export-friendly twin (same math) only while tracing
    blocks = list(model.transformer.resblocks)
    originals = [b.attn for b in blocks]
    try:
        for b in blocks:
            b.attn = wrapper(b.attn)
        _export_tokens(tower, sample, path, custom_opsets={"com.microsoft": 1} if ort_attention else None)
    finally:
        for b, a in zip(blocks, originals):
            b.attn = a
    return path


def export_hf_text_tower(model: torch.nn.Module, path: str | os.PathLike[str],
                         attn_implementation: str | None = "eager") -> Path:
    """Export a Hugging Face text tower (fp32, dynamic batch and length) to `path`, atomically.

    `attn_implementation`: transformers' attention implementation to trace with, set only while
    tracing and restored after; `eager` writes the matmul/softmax pattern that onnxruntime's `bert`
    optimizer fuses into one `Attention` node per layer; None traces the tower as it is.
    """
    path = Path(path)
    bert = model.text.transformer
    pad = text_pad_id(model)
    tower = _HFTextTower(model).eval().float()
    # one row with padding, so the traced graph keeps the attention mask (transformers may drop an
    # all-ones mask while tracing) and the masked mean pooling
    vocab = int(getattr(model.text.config, "vocab_size", 30522))
    offsets = torch.tensor([[1, 2, 3, 4, 0], [1, 2, 3, 4, 5]])  # 0 marks the padding
    sample = torch.where(offsets == 0, pad, (pad + offsets) % vocab).long()
    original = getattr(bert.config, "_attn_implementation", None)
    swap = attn_implementation is not None and attn_implementation != original
    if swap and not hasattr(bert, "set_attn_implementation"):
        raise ValueError(f"this transformers version cannot switch attention to {attn_implementation}")
    try:
        if swap:
            bert.set_attn_implementation(attn_implementation)
        _export_tokens(tower, sample, path)
    finally:
        if swap and original is not None:
            bert.set_attn_implementation(original)
    return path


def _export_tokens(tower: torch.nn.Module, sample: torch.Tensor, path: Path,
                   custom_opsets: dict[str, int] | None = None) -> None:
    """Both text exports: tokens [batch, length] -> embedding [batch, D], batch and length dynamic."""
    export_module(tower, sample, path, input_name=INPUT, output_names=[OUTPUT],
                  dynamic_axes={INPUT: {0: "batch", 1: "length"}}, custom_opsets=custom_opsets)


def _fuse(src: Path, dst: Path, num_heads: int, hidden: int, model_type: str = "clip") -> Path | None:
    """Attention/LayerNorm/GELU fusion with onnxruntime's transformer optimizer, when available."""
    try:
        from onnxruntime.transformers import optimizer
    except Exception:  # optional: an onnxruntime without the transformers tools still works unfused
        return None
    try:
        opt = optimizer.optimize_model(str(src), model_type=model_type, num_heads=num_heads,
                                       hidden_size=hidden, opt_level=0)
        save_with(dst, lambda p: opt.save_model_to_file(str(p)))
        return dst
    except Exception as exc:
        log.info("onnx text: transformer fusion skipped (%s: %s)", type(exc).__name__, exc)
        return None


def _cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).cpu()


VARIANTS = ("attention", "plain")  # preference order; the first that passes the self-check is used
HF_VARIANTS = ("sdpa", "eager")  # the same for Hugging Face towers (attention implementation traced)


def _variant_file(cache_dir: Path, key: str, variant: str, fused: bool) -> Path:
    return cache_dir / f"{key}.{variant}{'.fused' if fused else ''}.onnx"


def build_onnx_text(loaded: LoadedModel, cache_dir: str | os.PathLike[str], threads: int = 1,
                    fuse: bool = True, spinning: bool = False,
                    variants: tuple[str, ...] | None = None) -> OnnxTowerEncoder:
    """Export (or reuse the cached export of) the model's text tower and open a session on it.

    Variants, best first: for a CLIP tower `attention` (onnxruntime's fused causal Attention op) and
    `plain` (standard ONNX ops only); for a Hugging Face tower `sdpa` and `eager` (see the module
    docstring); each optionally passed through onnxruntime's transformer optimizer (`fuse`: model
    type `clip` or `bert`). Every candidate must match open_clip's full-length `encode_text`
    (cosine >= 0.9999 on a few token batches) before it is used; one that does not is skipped.
    """
    model = loaded.model
    arch = text_tower_kind(model)  # which text tower: the exporter and its variants
    if arch is None:
        raise ValueError(f"{loaded.identity.model} has no exportable text tower "
                         "(open_clip CLIP or Hugging Face)")
    if variants is None:
        variants = VARIANTS if arch == "clip" else HF_VARIANTS
    cache_dir = Path(cache_dir)
    key = cache_key(loaded)
    cpu_model = model if loaded.device.type == "cpu" else _cpu_copy(model)
    pad_id = text_pad_id(model)
    if arch == "clip":
        width = int(model.transformer.width)
        heads = int(model.transformer.resblocks[0].attn.num_heads)
    else:
        width = int(model.text.config.hidden_size)
        heads = int(model.text.config.num_attention_heads)
    # the padded length the tokenizer gives (64 for lit-effnet-minilm; an HF tower's own
    # context_length is its position table, 512 for BERT)
    context = int(getattr(getattr(loaded, "tokenizer", None), "context_length", None)
                  or getattr(model, "context_length", 77))
    errors = []
    for variant in variants:
        base = _variant_file(cache_dir, key, variant, fused=False)
        try:
            if not base.is_file():
                t = time.perf_counter()
                if arch == "clip":
                    export_text_tower(cpu_model, base, ort_attention=variant == "attention")
                else:
                    export_hf_text_tower(cpu_model, base, attn_implementation=variant)
                log.info("onnx text: exported %s in %.1fs", base.name, time.perf_counter() - t)
        except Exception as exc:
            errors.append(f"{variant}: {type(exc).__name__}: {exc}")
            continue
        candidates = []
        if fuse:
            fused = _variant_file(cache_dir, key, variant, fused=True)
            model_type = "clip" if arch == "clip" else "bert"
            if fused.is_file() or _fuse(base, fused, heads, width, model_type=model_type):
                candidates.append(fused)
        candidates.append(base)
        for path in candidates:
            try:
                enc = OnnxTowerEncoder(path, "text", threads=threads, spinning=spinning, pad_id=pad_id)
                enc.self_check_cos = self_check(enc, cpu_model.encode_text,
                                                _check_tokens(cpu_model, arch, pad_id, context))
                log.info("onnx text: using %s (min cosine vs torch %.6f)", path.name, enc.self_check_cos)
                return enc
            except Exception as exc:  # a graph that fails or changes the result is not served
                errors.append(f"{path.name}: {type(exc).__name__}: {exc}")
                log.info("onnx text: %s rejected (%s)", path.name, exc)
    raise RuntimeError("no ONNX text variant passed: " + "; ".join(errors))


def _check_tokens(model: torch.nn.Module, arch: TextTower, pad_id: int,
                  context: int | None) -> Iterator[torch.Tensor]:
    """Token batches for the self-check against open_clip's full-length `encode_text`.

    The batches mix lengths, so the session runs both unpadded (batch 1, truncated) and padded
    rows; `context` is the padded length of the reference (the tokenizer's).
    """
    ctx = int(context or getattr(model, "context_length", 77))
    g = torch.Generator().manual_seed(0)
    if arch == "clip":
        eot = int(getattr(model, "vocab_size", 49408)) - 1
        start, low, high, pad = eot - 1, 1, eot - 1, 0
    else:  # any non-pad ids: the HF tower masks by pad id only (101/102 are BERT's [CLS]/[SEP])
        vocab = int(getattr(model.text.config, "vocab_size", 30522))
        pad = pad_id
        start, eot, low, high = min(101, vocab - 1), min(102, vocab - 1), 1, vocab
    for lengths in ((3,), (12, 5), (ctx, 7)):
        tokens = torch.full((len(lengths), ctx), pad, dtype=torch.long)
        for i, n in enumerate(lengths):
            tokens[i, 0] = start  # start-of-text
            tokens[i, 1:n - 1] = torch.randint(low, high, (n - 2,), generator=g)
            tokens[i, n - 1] = eot
        tokens[(tokens == pad) & (torch.arange(ctx) < torch.tensor(lengths)[:, None])] = pad + 1
        yield tokens


def maybe_onnx_text(loaded: LoadedModel, cache_dir: str | os.PathLike[str], threads: int = 1,
                    fuse: bool = True, spinning: bool = False) -> OnnxTowerEncoder | None:
    """An ONNX text encoder for `loaded`, or None (logged) when the model has no exportable text
    tower (neither an open_clip CLIP tower nor a Hugging Face one), is not on the CPU, or
    export/loading/the equality self-check fails."""
    missing = None if text_tower_kind(loaded.model) else \
        "has no exportable text tower (open_clip CLIP or Hugging Face)"
    return maybe_onnx("text", loaded, missing,
                      lambda: build_onnx_text(loaded, cache_dir, threads=threads, fuse=fuse, spinning=spinning))
