"""The cached-feature path, for model families with `feature_cache` (lit-effnet-minilm).

With the towers locked except the last N image blocks / text layers, the frozen part of each tower
runs once over every image and caption; its outputs are cached under `<out>/features/` and training
runs only the unlocked blocks and the heads — the model's own modules, so the trained model *is* the
checkpoint (no separate head to write back). Frozen image blocks run through ONNX Runtime or with
BatchNorm folded into the convolutions, whichever agrees with the blocks themselves on the first batch.

`extract_features` fills the cache; `FeatureBackend` is the loop's backend on top of it.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from clipsearch.families import family_of
from clipsearch.manifest import ArtifactError, read_json, save_npy_atomic, sha256_json, write_json_atomic
from clipsearch.models import LoadedModel
from clipsearch.onnx.image import onnx_module_runner
from clipsearch.towers import text_pad_id
from offline.finetune.config import FinetuneError
from offline.finetune.inputs import PlannedBatch, SplitData

log = logging.getLogger(__name__)

FEATURE_FORMAT = 1


class TokenStates:
    """Hidden states of every caption's real tokens (no padding), stored flat.

    Caption i is `flat[offsets[i]:offsets[i + 1]]`; `batch(rows)` pads a batch on the right with a
    mask, which is all a BERT layer needs to give the same states as the full model.
    """

    def __init__(self, flat: torch.Tensor, offsets: torch.Tensor):
        self.flat = flat
        self.offsets = offsets.long()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def batch(self, rows: torch.Tensor | np.ndarray | slice) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(len(self))[rows] if isinstance(rows, slice) else torch.as_tensor(rows).long()
        start, lengths = self.offsets[rows], self.offsets[rows + 1] - self.offsets[rows]
        width = int(lengths.max()) if len(rows) else 0
        pos = torch.arange(width)
        mask = pos[None, :] < lengths[:, None]
        hidden = self.flat.new_zeros(len(rows), width, self.flat.shape[1])
        hidden[mask] = self.flat[(start[:, None] + pos[None, :])[mask]]
        return hidden, mask.long()

    @staticmethod
    def from_batches(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], n: int) -> "TokenStates":
        """From (rows, hidden (B, L, d), mask (B, L)) batches in any row order."""
        lengths = torch.zeros(n, dtype=torch.long)
        for rows, _, mask in parts:
            lengths[rows] = mask.sum(1)
        offsets = torch.zeros(n + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(lengths, 0)
        flat = torch.empty(int(offsets[-1]), parts[0][1].shape[-1], dtype=parts[0][1].dtype)
        for rows, hidden, mask in parts:
            starts = offsets[rows]
            pos = torch.arange(hidden.shape[1])
            keep = mask.bool()
            flat[(starts[:, None] + pos[None, :])[keep]] = hidden[keep]
        return TokenStates(flat, offsets)


def _bert_mask(text: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> Any:
    """The attention mask BertModel builds for its layers (same helper, so the same numbers)."""
    try:
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=text.transformer.config, inputs_embeds=hidden, attention_mask=mask)
    except ImportError:  # older transformers: the classic additive mask
        return (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min


def _bert_layers(text: nn.Module, layers: list[nn.Module], hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    attn = _bert_mask(text, hidden, mask)
    for layer in layers:
        out = layer(hidden, attn)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def _mean_pool(text: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return text.pooler(SimpleNamespace(last_hidden_state=hidden), mask)


class FeatureBackend:
    """A model with frozen tower fronts (lit-effnet-minilm): cached activations through the trainable ends.

    `feats[split]["images"][c]` holds trunk activations at the input of the last c blocks (c = 0:
    the pooled 1280-d output); `feats[split]["texts"][c]` the token states at the input of the last
    c BERT layers (c = 0: MiniLM's mean-pooled 384-d output). Training with `image_unlocked` /
    `text_unlocked` trailing blocks runs the frozen blocks between the cache and those once, then
    only the unlocked blocks and the heads per step — the model's own modules throughout.

    With `mirror` (the cache then also holds `"images_mirror"`, the same of each horizontally
    flipped image): training sees each image or its mirror, a fair coin per image and step, and
    `embed` gives each image as the normalised mean of its and its mirror's embeddings, which is what
    a model served with `image_tta: mirror` computes.
    """

    kind = "features"

    def __init__(self, model: nn.Module, feats: dict[str, dict[str, dict[int, Any]]],
                 splits: dict[str, SplitData], image_unlocked: int, text_unlocked: int,
                 device: torch.device, chunk: int = 256, mirror: bool = False):
        self.model, self.splits, self.device, self.chunk, self.mirror = model, splits, device, chunk, mirror
        groups = family_of(model).unlock_groups(model)
        vblocks, tlayers = groups.image, groups.text
        self.image_unlocked, self.text_unlocked = image_unlocked, text_unlocked
        self.image_blocks = vblocks[len(vblocks) - image_unlocked:] if image_unlocked else []
        self.text_layers = tlayers[len(tlayers) - text_unlocked:] if text_unlocked else []
        self.feats: dict[str, dict[str, Any]] = {}
        image_parts = ("images", "images_mirror") if mirror else ("images",)
        for split, f in feats.items():
            self.feats[split] = {}
            for part in image_parts:
                if part not in f:
                    raise FinetuneError(f"the {split} feature cache has no mirrored images; extract with mirror=True")
                img_cut = _source_cut(f[part], image_unlocked, "image")
                img = f[part][img_cut]
                if img_cut > image_unlocked:
                    img = _run_frozen_image(model, vblocks[len(vblocks) - img_cut:len(vblocks) - image_unlocked],
                                            img, pool=image_unlocked == 0, chunk=chunk)
                self.feats[split][part] = img
            txt_cut = _source_cut(f["texts"], text_unlocked, "text")
            txt = f["texts"][txt_cut]
            if txt_cut > text_unlocked:
                txt = _run_frozen_text(model, tlayers[len(tlayers) - txt_cut:len(tlayers) - text_unlocked], txt,
                                       pool=text_unlocked == 0, chunk=chunk)
            self.feats[split]["texts"] = txt

    def _image(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.image_unlocked:
            for blk in self.image_blocks:
                x = blk(x)
            x = self.model.visual.trunk.forward_head(x)
        return F.normalize(self.model.visual.head(x), dim=-1)

    def _text(self, x: Any) -> torch.Tensor:
        text = self.model.text
        if self.text_unlocked:
            hidden, mask = (t.to(self.device, non_blocking=True) for t in x)
            x = _mean_pool(text, _bert_layers(text, self.text_layers, hidden, mask), mask)
        return F.normalize(text.proj(x.to(self.device, non_blocking=True)), dim=-1)

    def _texts_at(self, split: str, rows: Any) -> Any:
        t = self.feats[split]["texts"]
        return t.batch(rows) if isinstance(t, TokenStates) else t[rows]

    def inputs(self, batches: list[PlannedBatch]) -> Iterator[tuple[Any, Any]]:
        train = self.feats["train"]
        for img_rows, cap_rows in batches:
            rows = torch.from_numpy(img_rows)
            images = train["images"][rows]
            if self.mirror:  # the global RNG, seeded per epoch by the loop: reproducible on resume
                flip = torch.rand(len(rows)) < 0.5
                images[flip] = train["images_mirror"][rows[flip]]
            yield images, self._texts_at("train", cap_rows)

    def forward(self, batch: tuple[Any, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._image(batch[0]), self._text(batch[1])

    @torch.no_grad()
    def embed(self, split: str, mirror: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Every image and caption of a split; images mirror-averaged when the backend mirrors
        (`mirror=False`: the unmirrored images alone)."""
        self.model.eval()
        mirror = self.mirror if mirror is None else mirror
        f = self.feats[split]
        n_img, n_txt = len(f["images"]), len(f["texts"])
        imgs = []
        for i in range(0, n_img, self.chunk):
            emb = self._image(f["images"][i:i + self.chunk]).float().cpu()
            if mirror:
                emb = F.normalize(emb + self._image(f["images_mirror"][i:i + self.chunk]).float().cpu(), dim=-1)
            imgs.append(emb)
        txts = [self._text(self._texts_at(split, slice(i, i + self.chunk))).float().cpu()
                for i in range(0, n_txt, self.chunk)]
        return torch.cat(imgs).numpy(), torch.cat(txts).numpy()

    def embed_plain(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """`embed` without the mirror: one image row per image, for the CCA start of the heads."""
        return self.embed(split, mirror=False)


def _source_cut(available: dict[int, Any], unlocked: int, tower: str) -> int:
    """The cached cut to start from: the nearest one at or before the first unlocked block."""
    usable = [c for c in available if c >= unlocked]
    if not usable:
        raise FinetuneError(f"cached {tower} features sit {max(available)} blocks from the end; "
                            f"cannot unlock {unlocked}")
    return min(usable)


@torch.no_grad()
def _run_frozen_image(model: nn.Module, blocks: list[nn.Module], x: torch.Tensor, pool: bool,
                      chunk: int) -> torch.Tensor:
    model.eval()
    out = []
    for i in range(0, len(x), chunk):
        h = x[i:i + chunk]
        for blk in blocks:
            h = blk(h)
        out.append(model.visual.trunk.forward_head(h) if pool else h)
    return torch.cat(out)


@torch.no_grad()
def _run_frozen_text(model: nn.Module, layers: list[nn.Module], states: TokenStates, pool: bool,
                     chunk: int) -> torch.Tensor | TokenStates:
    model.eval()
    n = len(states)
    lengths = states.offsets[1:] - states.offsets[:-1]
    order = torch.argsort(lengths, stable=True)
    pooled = torch.empty(n, states.flat.shape[1]) if pool else None
    parts = []
    for i in range(0, n, chunk):
        rows = order[i:i + chunk]
        hidden, mask = states.batch(rows)
        hidden = _bert_layers(model.text, layers, hidden, mask)
        if pool:
            pooled[rows] = _mean_pool(model.text, hidden, mask).float()
        else:
            parts.append((rows, hidden.float(), mask))
    return pooled if pool else TokenStates.from_batches(parts, n)


# --------------------------------------------------------------------------------------------
# The feature cache
# --------------------------------------------------------------------------------------------

def fold_batchnorm(module: nn.Module) -> nn.Module:
    """An inference copy of a conv net with every BatchNorm folded into the conv before it.

    timm's BatchNormAct2d carries its activation; it is replaced by that activation alone.
    """
    module = copy.deepcopy(module).eval()
    named = dict(module.named_modules())
    prev_conv: nn.Conv2d | None = None
    for name, m in list(module.named_modules()):
        if isinstance(m, nn.Conv2d):
            prev_conv = m
        elif isinstance(m, nn.BatchNorm2d) and prev_conv is not None and prev_conv.out_channels == m.num_features:
            scale = m.weight / torch.sqrt(m.running_var + m.eps)
            bias = prev_conv.bias if prev_conv.bias is not None else torch.zeros_like(m.running_mean)
            with torch.no_grad():
                prev_conv.weight.mul_(scale.view(-1, 1, 1, 1))
                prev_conv.bias = nn.Parameter((bias - m.running_mean) * scale + m.bias)
            tail = [mod for mod in (getattr(m, "drop", None), getattr(m, "act", None)) if mod is not None]
            parent, _, attr = name.rpartition(".")
            setattr(named[parent] if parent else module, attr, nn.Sequential(*tail) if tail else nn.Identity())
            prev_conv = None
    return module


def feature_cache_dir(out: Path, loaded: LoadedModel) -> Path:
    key = sha256_json({"format": FEATURE_FORMAT, "model": loaded.identity.to_dict(),
                       "preprocess": repr(loaded.preprocess)})
    return Path(out) / "features" / loaded.identity.model / key[:16]


def extract_features(out: Path, loaded: LoadedModel, splits: dict[str, SplitData], image_cut: int,
                     text_cut: int, workers: int, batch_size: int = 64,
                     force: bool = False, mirror: bool = False) -> dict[str, dict[str, dict[int, Any]]]:
    """Frozen-tower features of every split, cached per split and part (resumable, idempotent).

    Returns `{split: {"images": {0: pooled, image_cut: activations}, "texts": {0: pooled,
    text_cut: TokenStates}}}`, all fp32, and with `mirror` also `"images_mirror"`: the same for
    each image flipped left to right. One pass per part computes both of its cuts; captions run in
    length-sorted batches (less padding, same result).
    """
    cdir = feature_cache_dir(out, loaded)
    manifest_path = cdir / "manifest.json"
    manifest: dict[str, Any] = {}
    if manifest_path.is_file() and not force:
        try:
            manifest = read_json(manifest_path)
        except ArtifactError:
            manifest = {}
    manifest.setdefault("parts", {})
    manifest.update({"model": loaded.identity.to_dict(), "preprocess": repr(loaded.preprocess)})
    result: dict[str, dict[str, dict[int, Any]]] = {}
    for split, data in splits.items():
        result[split] = {}
        parts = [("images", image_cut), ("texts", text_cut)] + ([("images_mirror", image_cut)] if mirror else [])
        for part, cut in parts:
            names = [f"{split}.{part}.c{c}" for c in sorted({0, cut})]
            if all(manifest["parts"].get(n) == data.sha256 and (cdir / f"{n}.npy").is_file() for n in names):
                result[split][part] = {c: _load_feature(cdir, f"{split}.{part}.c{c}") for c in sorted({0, cut})}
                continue
            t = time.perf_counter()
            arrays = (_extract_texts(loaded, data, cut, max(batch_size, 128)) if part == "texts"
                      else _extract_images(loaded, data, cut, workers, batch_size, flip=part == "images_mirror"))
            for c, value in arrays.items():
                _save_feature(cdir, f"{split}.{part}.c{c}", value)
                manifest["parts"][f"{split}.{part}.c{c}"] = data.sha256
            manifest.setdefault("seconds", {})[f"{split}.{part}"] = round(time.perf_counter() - t, 2)
            write_json_atomic(manifest_path, manifest)
            log.info("features[%s.%s]: %d in %.1f s", split, part, len(arrays[0]), time.perf_counter() - t)
            result[split][part] = arrays
    return result


def _save_feature(cdir: Path, name: str, value: torch.Tensor | TokenStates) -> None:
    if isinstance(value, TokenStates):
        save_npy_atomic(cdir / f"{name}.offsets.npy", value.offsets.numpy())
        value = value.flat
    save_npy_atomic(cdir / f"{name}.npy", value.numpy())


def _load_feature(cdir: Path, name: str) -> torch.Tensor | TokenStates:
    arr = torch.from_numpy(np.load(cdir / f"{name}.npy"))
    offsets = cdir / f"{name}.offsets.npy"
    return TokenStates(arr, torch.from_numpy(np.load(offsets))) if offsets.is_file() else arr


class _ImageFront(nn.Module):
    """The frozen image trunk as one module: (activations at the cut, pooled features), or pooled only."""

    def __init__(self, model: nn.Module, cut: int):
        super().__init__()
        blocks = family_of(model).unlock_groups(model).image
        self.front = nn.Sequential(*blocks[:len(blocks) - cut])
        self.back = nn.Sequential(*blocks[len(blocks) - cut:])
        trunk = model.visual.trunk
        if not isinstance(trunk.classifier, nn.Identity):  # forward_head in eval = global_pool here
            raise FinetuneError("the image trunk has a classifier; cannot cache its pooled features")
        self.pool = trunk.global_pool
        self.cut = cut

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.front(x)
        pooled = self.pool(self.back(h))
        return (h, pooled) if self.cut else (pooled,)


def _image_runner(module: _ImageFront, example: torch.Tensor, device: torch.device):
    """The fastest exact way to run the frozen image trunk: ONNX Runtime on CPU when installed
    (about 2x eager PyTorch for EfficientNet's depthwise convolutions here), else the BatchNorm-folded
    module. Either is checked against the module itself on `example` and dropped if it differs."""
    module = module.eval()
    with torch.inference_mode():
        ref = module(example)

    def agrees(out: tuple[torch.Tensor, ...]) -> bool:
        return all(torch.allclose(o, r, rtol=1e-3, atol=1e-4 * float(r.abs().max())) for o, r in zip(out, ref))

    if device.type == "cpu":
        try:
            run = onnx_module_runner(module, example)  # in memory, torch's thread budget
            if agrees(run(example)):
                return run, "onnxruntime"
            log.warning("ONNX Runtime differs from the model; using PyTorch")
        except Exception as exc:  # not installed, or the export failed: PyTorch is the fallback
            log.debug("ONNX Runtime unavailable (%s: %s)", type(exc).__name__, exc)
    folded = fold_batchnorm(module)
    with torch.inference_mode():
        if agrees(folded(example)):
            return folded, "pytorch-folded-bn"
    log.warning("folded BatchNorm differs from the model; using the unfolded blocks")
    return module, "pytorch"


@torch.inference_mode()
def _extract_images(loaded: LoadedModel, data: SplitData, cut: int, workers: int,
                    batch_size: int, flip: bool = False) -> dict[int, torch.Tensor]:
    from torch.utils.data import DataLoader

    from offline.embed import ImageFiles, collate_images

    model = loaded.model.eval()
    module = _ImageFront(model, cut).to(loaded.device)
    loader = DataLoader(ImageFiles(data.image_paths, loaded.preprocess), batch_size=batch_size,
                        num_workers=workers, collate_fn=collate_images, prefetch_factor=4 if workers else None)
    at_cut: list[torch.Tensor] = []
    pooled: list[torch.Tensor] = []
    run = None
    desc = f"{data.name} {'mirrored ' if flip else ''}image features"
    with tqdm(total=data.n_images, desc=desc, unit="img") as bar:
        for idx, pixels, bad in loader:
            if bad:
                raise FinetuneError(f"{data.name} image {data.image_ids[bad[0][0]]} could not be decoded "
                                    f"({bad[0][1]}); run prepare again.")
            pixels = pixels.to(loaded.device)
            if flip:  # the preprocessed mirror image, as the encoder's image_tta "mirror" makes it
                pixels = pixels.flip(-1)
            if run is None:
                run, how = _image_runner(module, pixels[:4], loaded.device)
                log.info("image features via %s", how)
            out = run(pixels)
            if cut:
                at_cut.append(out[0].float().cpu())
            pooled.append(out[-1].float().cpu())
            bar.update(len(idx))
    result = {0: torch.cat(pooled)}
    if cut:
        result[cut] = torch.cat(at_cut)
    return result


@torch.inference_mode()
def _extract_texts(loaded: LoadedModel, data: SplitData, cut: int, batch_size: int) -> dict[int, Any]:
    text = loaded.model.eval().text
    pad_id = text_pad_id(loaded.model)
    tokens = loaded.tokenizer(data.captions)
    lengths = (tokens != pad_id).sum(1)
    order = torch.argsort(lengths, stable=True)
    pooled = torch.empty(len(data.captions), text.proj.in_features)
    parts = []
    for i in tqdm(range(0, len(order), batch_size), desc=f"{data.name} caption features", unit="batch"):
        rows = order[i:i + batch_size]
        tok = tokens[rows][:, :int(lengths[rows].max())].to(loaded.device)  # right padding: same output
        mask = (tok != pad_id).long()
        out = text.transformer(input_ids=tok, attention_mask=mask, output_hidden_states=bool(cut))
        pooled[rows] = _mean_pool(text, out.last_hidden_state, mask).float().cpu()
        if cut:
            # hidden_states[0] is the embedding output, [k] the output of layer k
            parts.append((rows, out.hidden_states[len(out.hidden_states) - 1 - cut].float().cpu(), mask.cpu()))
    result: dict[int, Any] = {0: pooled}
    if cut:
        result[cut] = TokenStates.from_batches(parts, len(data.captions))
    return result

