"""Everything start-up loads, in one immutable object, and the checks that make it trustworthy.

`load_resources(settings)` reads the served split's index manifests first and loads the model they
name, so the query encoder is always the one that built the index. It refuses to serve a mismatched
set: two indexes from different models or embeddings runs, metadata whose row counts differ from the
index, a dimension that differs from the model's, or a checkpoint whose sha256 differs from the one
recorded. Each failure is one `ArtifactError` / `ModelLoadError` whose message names the problem and
the file (relative to ARTIFACTS_DIR), because it becomes /readyz's reason and a single log line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.encoder import ClipEncoder, Encoder, image_backend_for, text_backend_for
from clipsearch.index import VectorIndex
from clipsearch.manifest import ArtifactError, read_json, sha256_file, sha256_json
from clipsearch.models import ModelLoadError, is_local_checkpoint, load_model

from app.config import Settings

IMAGE_INDEX = "images.hnsw"
TEXT_INDEX = "texts.hnsw"
MODEL_KEYS = ("model", "pretrained", "checkpoint_sha256", "embed_dim")


@dataclass(frozen=True)
class ImageRecord:
    image_id: str
    image_path: str


@dataclass(frozen=True)
class CaptionRecord:
    caption_id: str
    image_id: str
    caption: str


@dataclass(frozen=True)
class Resources:
    encoder: Encoder
    image_index: VectorIndex  # row i is images[i]
    text_index: VectorIndex  # row i is captions[i]
    images: tuple[ImageRecord, ...]
    captions: tuple[CaptionRecord, ...]
    captions_by_image: Mapping[str, tuple[str, ...]]
    image_files: Mapping[str, Path]  # image_id -> file served by GET /images/{image_id}
    version: str  # identifies the index pair; part of every cache key
    model: Mapping[str, Any]  # ModelIdentity.to_dict() of the served model
    split: str
    caption_offsets: np.ndarray  # row i: captions[i]'s score offset in text_index (hubness; else 0)


def make_resources(encoder: Encoder, image_index: VectorIndex, text_index: VectorIndex,
                   images: Sequence[ImageRecord], captions: Sequence[CaptionRecord],
                   model: Mapping[str, Any], split: str = "test", images_dir: Path | None = None,
                   base_dir: Path | None = None) -> Resources:
    """Assemble resources from loaded parts (start-up, or tests with a fake encoder)."""
    if len(images) != image_index.ntotal:
        raise ArtifactError(f"images.json has {len(images)} records but the image index holds "
                            f"{image_index.ntotal} vectors; rebuild the index from these embeddings")
    if len(captions) != text_index.ntotal:
        raise ArtifactError(f"texts.json has {len(captions)} records but the text index holds "
                            f"{text_index.ntotal} vectors; rebuild the index from these embeddings")
    for name, index in (("image", image_index), ("text", text_index)):
        if index.dim != encoder.dim:
            raise ArtifactError(f"the {name} index has dimension {index.dim} but the model "
                                f"{model.get('model')} embeds to {encoder.dim}")
    by_image: dict[str, list[str]] = {}
    for c in captions:
        by_image.setdefault(c.image_id, []).append(c.caption)
    files = {}
    for rec in images:
        path = Path(rec.image_path)
        if images_dir is not None:
            path = images_dir / path.name
        elif not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        files[rec.image_id] = path
    if len(files) != len(images):
        raise ArtifactError("images.json lists the same image_id more than once")
    version = sha256_json([image_index.manifest, text_index.manifest])[:16]
    return Resources(encoder, image_index, text_index, tuple(images), tuple(captions),
                     {k: tuple(v) for k, v in by_image.items()}, files, version,
                     {k: model.get(k) for k in MODEL_KEYS}, split, text_index.offsets())


def load_resources(settings: Settings) -> Resources:
    root = settings.artifacts_dir
    if not root.is_dir():
        raise ArtifactError(f"ARTIFACTS_DIR {root} does not exist or is not a folder")
    split = settings.serve_split
    idx_dir, emb_dir = settings.split_indexes_dir, settings.split_embeddings_dir

    manifests = {name: _read_index_manifest(root, idx_dir / f"{name}.json", split)
                 for name in (IMAGE_INDEX, TEXT_INDEX)}
    img_m, txt_m = manifests[IMAGE_INDEX], manifests[TEXT_INDEX]
    if _model_of(img_m) != _model_of(txt_m):
        raise ArtifactError(f"the image and text indexes of split '{split}' were built with different "
                            f"models ({_describe(img_m['model'])} vs {_describe(txt_m['model'])}); "
                            f"rebuild both from one embeddings run")
    model = _model_of(img_m)
    _check_model_fields(model, split)

    emb_manifest_path = emb_dir / "manifest.json"
    emb_sha = sha256_file(emb_manifest_path) if emb_manifest_path.is_file() else None
    if emb_sha is None:
        raise ArtifactError(f"missing {_rel(emb_manifest_path, root)} (embed split '{split}' first)")
    for name, m in manifests.items():
        if m.get("embeddings_manifest_sha256") != emb_sha:
            raise ArtifactError(f"index {name} was built from a different embeddings run than "
                                f"{_rel(emb_manifest_path, root)}; rebuild the indexes of split '{split}'")
    emb_model = read_json(emb_manifest_path).get("model")
    if isinstance(emb_model, dict) and _model_of({"model": emb_model}) != model:
        raise ArtifactError(f"{_rel(emb_manifest_path, root)} names model {_describe(emb_model)} but "
                            f"the indexes name {_describe(model)}")

    images = _read_records(root, emb_dir / "images.json", ImageRecord, ("image_id", "image_path"))
    captions = _read_records(root, emb_dir / "texts.json", CaptionRecord,
                             ("caption_id", "image_id", "caption"))
    indexes = {}
    for name, m in manifests.items():
        if m.get("count") is not None and m["count"] != len(images if name == IMAGE_INDEX else captions):
            what = "images.json" if name == IMAGE_INDEX else "texts.json"
            raise ArtifactError(f"index {name} holds {m['count']} vectors but {what} has "
                                f"{len(images if name == IMAGE_INDEX else captions)} records; "
                                f"rebuild the indexes of split '{split}'")
        if m.get("dim") is not None and m["dim"] != model["embed_dim"]:
            raise ArtifactError(f"index {name} has dimension {m['dim']} but its model "
                                f"{_describe(model)} embeds to {model['embed_dim']}")
        indexes[name] = VectorIndex.load(idx_dir / f"{name}.json", verify=settings.verify_index_checksum)

    pretrained = _resolve_checkpoint(model.get("pretrained"), model.get("checkpoint_sha256"), settings)
    loaded = load_model(model["model"], pretrained, device=settings.device,
                        checkpoint_sha256=model.get("checkpoint_sha256"))
    if not loaded.identity.same_weights(model):
        raise ModelLoadError(f"the loaded model {_describe(loaded.identity.to_dict())} is not the one the "
                             f"indexes were built with ({_describe(model)})")
    threads = settings.torch_threads or 1
    encoder = ClipEncoder(
        loaded,
        text_backend=text_backend_for(loaded, settings.text_backend, settings.onnx_cache_dir, threads),
        image_backend=image_backend_for(loaded, settings.image_backend, settings.onnx_cache_dir, threads))
    return make_resources(encoder, indexes[IMAGE_INDEX], indexes[TEXT_INDEX],
                          images, captions, model, split=split, images_dir=settings.images_dir,
                          base_dir=root)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _read_index_manifest(root: Path, path: Path, split: str) -> dict[str, Any]:
    if not path.is_file():
        raise ArtifactError(f"missing index manifest {_rel(path, root)} "
                            f"(build the indexes of split '{split}' with the offline pipeline)")
    try:
        manifest = read_json(path)
    except ArtifactError:
        raise ArtifactError(f"index manifest {_rel(path, root)} is not valid JSON (corrupt or "
                            f"half-written); rebuild the indexes") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("model"), dict):
        raise ArtifactError(f"index manifest {_rel(path, root)} has no 'model' entry; rebuild the indexes")
    if manifest.get("split") not in (None, split):
        raise ArtifactError(f"index manifest {_rel(path, root)} is for split '{manifest['split']}', "
                            f"not the served split '{split}'")
    return manifest


def _model_of(manifest: Mapping[str, Any]) -> dict[str, Any]:
    model = manifest["model"]
    return {k: model.get(k) for k in MODEL_KEYS}


def _check_model_fields(model: Mapping[str, Any], split: str) -> None:
    if not isinstance(model.get("model"), str) or not isinstance(model.get("embed_dim"), int):
        raise ArtifactError(f"the index manifests of split '{split}' do not name a model and its "
                            f"embed_dim; rebuild the indexes")


def _describe(model: Mapping[str, Any]) -> str:
    pretrained = model.get("pretrained")
    weights = Path(pretrained).name if pretrained and is_local_checkpoint(pretrained) else pretrained
    sha = model.get("checkpoint_sha256")
    return (f"{model.get('model')}/{weights or 'random-init'}"
            f"{'@' + sha[:12] if sha else ''} dim {model.get('embed_dim')}")


def _resolve_checkpoint(pretrained: str | None, sha: str | None, settings: Settings) -> str | None:
    """A local checkpoint at its recorded path, else by file name under ARTIFACTS_DIR/models."""
    if not pretrained or not is_local_checkpoint(pretrained):
        return pretrained
    recorded = Path(pretrained)
    if not sha:
        raise ArtifactError(f"the index manifests name checkpoint {recorded.name} without its "
                            f"checkpoint_sha256, so the weights cannot be verified; rebuild the indexes")
    candidates = [recorded] if recorded.is_absolute() else [settings.artifacts_dir / recorded, recorded]
    candidates.append(settings.models_dir / recorded.name)
    for path in candidates:
        if path.is_file():
            return str(path)
    raise ModelLoadError(f"checkpoint {recorded.name} is neither at its recorded path {recorded} nor "
                         f"in ARTIFACTS_DIR/models/; copy it there")


def _read_records(root: Path, path: Path, cls: type, keys: tuple[str, ...]) -> list[Any]:
    rel = _rel(path, root)
    if not path.is_file():
        raise ArtifactError(f"missing {rel} (embed the split first)")
    try:
        rows = read_json(path)
    except ArtifactError:
        raise ArtifactError(f"{rel} is not valid JSON (corrupt or half-written)") from None
    if not isinstance(rows, list):
        raise ArtifactError(f"{rel} must hold a JSON list of records")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in keys):
            raise ArtifactError(f"{rel} record {i} lacks one of {', '.join(keys)}")
        out.append(cls(**{k: row[k] for k in keys}))
    return out


def configure_threads(settings: Settings) -> None:
    import faiss
    import torch

    # Each inference worker runs one query at a time; torch and faiss default to every core per call,
    # so N workers would oversubscribe the CPU N-fold and make latency erratic. Cap both explicitly.
    torch.set_num_threads(settings.torch_threads or 1)
    faiss.omp_set_num_threads(settings.torch_threads or 1)
