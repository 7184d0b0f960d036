"""The `embed` stage: L2-normalised image and caption embeddings for a split.

Output (`<out>/embeddings/<split>/`): `images.npy` + `images.json` (image records in row order),
`texts.npy` + `texts.json` (caption records in row order) and `manifest.json` (model identity, data
hash, counts, created). Images and captions are two parts, each committed on its own, so a run that
is interrupted resumes at the part it had not finished; unchanged inputs reuse both.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from clipsearch.artifacts import ArtifactLayout
from clipsearch.encoder import ClipEncoder, PixelEncoder, TokenEncoder, image_backend_for, text_backend_for
from clipsearch.images import ImageDecodeError, decode_image
from clipsearch.manifest import now_iso, read_json, save_npy_atomic, sha256_file, sha256_json, write_json_atomic
from clipsearch.models import LoadedModel
from offline.data import read_split
from offline.prefetch import threaded_batches

log = logging.getLogger(__name__)

EMBED_FORMAT = 1


def embeddings_dir(out: Path, split: str) -> Path:
    return ArtifactLayout(out).embeddings_dir(split)


class ImageFiles(Dataset):
    """Decodes and preprocesses images in DataLoader workers; a bad file yields None, not a crash."""

    def __init__(self, paths: list[str], preprocess: Any):
        self.paths = paths
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, self.preprocess(decode_image(self.paths[i])), None
        except ImageDecodeError as exc:
            return i, None, str(exc)


def collate_images(batch: list[tuple[int, torch.Tensor | None, str | None]]):
    """`ImageFiles` items -> (indices decoded, stacked pixels or None, [(index, error)] of the rest)."""
    ok = [(i, t) for i, t, _ in batch if t is not None]
    bad = [(i, err) for i, t, err in batch if t is None]
    pixels = torch.stack([t for _, t in ok]) if ok else None
    return [i for i, _ in ok], pixels, bad


_collate = collate_images  # the old private name


def split_records(out: Path, split: str) -> tuple[list[dict], list[dict], str]:
    """Unique images (sorted by id) and captions of a split, plus the split file's hash."""
    path = ArtifactLayout(out).split_file(split)
    captions = read_split(path)
    images: dict[str, str] = {}
    for rec in captions:
        images.setdefault(rec["image_id"], rec["image_path"])
    image_recs = [{"image_id": k, "image_path": images[k]} for k in sorted(images)]
    text_recs = [{"caption_id": r["caption_id"], "image_id": r["image_id"], "caption": r["caption"]}
                 for r in captions]
    return image_recs, text_recs, sha256_file(path)


def embed_images(loaded: LoadedModel, paths: list[str], batch_size: int, workers: int,
                 desc: str = "images", image_backend: PixelEncoder | None = None,
                 ) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """Encode image files; returns (vectors of the good rows, their indices, bad (index, reason)).

    `image_backend`: e.g. the ONNX Runtime image tower (`clipsearch.encoder.image_backend_for`),
    self-checked against torch when it was built."""
    encoder = ClipEncoder(loaded, batch_size=batch_size, image_backend=image_backend)
    files = ImageFiles(paths, loaded.preprocess)
    if workers > 0:
        loader: Any = DataLoader(files, batch_size=batch_size, num_workers=workers, collate_fn=collate_images,
                                 pin_memory=loaded.device.type == "cuda", persistent_workers=False,
                                 prefetch_factor=4)
    else:  # decode in threads of this process, overlapped with the forward pass (offline/prefetch.py)
        loader = threaded_batches(files, batch_size, collate=collate_images)
    vecs, kept, bad = [], [], []
    with tqdm(total=len(paths), desc=desc, unit="img") as bar:
        for idx, pixels, errs in loader:
            if pixels is not None:
                vecs.append(encoder.encode_pixels(pixels).cpu().numpy())
                kept.extend(idx)
            bad.extend(errs)
            bar.update(len(idx) + len(errs))
    arr = np.concatenate(vecs).astype(np.float32) if vecs else np.zeros((0, encoder.dim), np.float32)
    return arr, kept, bad


def embed_texts(loaded: LoadedModel, captions: list[str], batch_size: int,
                text_backend: TokenEncoder | None = None) -> np.ndarray:
    """Encode captions in order; `text_backend`: e.g. the ONNX Runtime text tower
    (`clipsearch.encoder.text_backend_for`)."""
    encoder = ClipEncoder(loaded, batch_size=batch_size, text_backend=text_backend)
    # chunks of 16 batches: the encoder sorts each by length (less padding), the bar moves per chunk
    chunk = 16 * batch_size
    parts = []
    with tqdm(total=len(captions), desc="captions", unit="caption") as bar:
        for i in range(0, len(captions), chunk):
            parts.append(encoder.encode_texts(captions[i:i + chunk]))
            bar.update(len(parts[-1]))
    return np.concatenate(parts) if parts else np.zeros((0, encoder.dim), np.float32)


def embed(out: Path, split: str, loaded: LoadedModel, batch_size: int = 64, workers: int = 2,
          force: bool = False, image_backend: str = "auto", text_backend: str = "onnx",
          captions: bool = True) -> dict[str, Any]:
    """Embed one split's images and captions; reuse what is already there for the same inputs.

    `captions=False` embeds the images only (the hubness stage's query bank): `load_embeddings` then
    refuses the split as incomplete and `load_image_embeddings` reads it.

    `image_backend` / `text_backend`: "onnx" runs the tower through ONNX Runtime when it exports and
    passes its self-check (else torch), "bf16" / "auto" (image) as `clipsearch.encoder.tower_backend`
    says, "torch" always uses torch. All give the same vectors (cosine >= 0.9999, checked when the
    backend is built), so the embeddings' key does not depend on the choice."""
    t0 = time.perf_counter()
    out = Path(out)
    edir = embeddings_dir(out, split)
    edir.mkdir(parents=True, exist_ok=True)
    image_recs, text_recs, data_hash = split_records(out, split)
    identity = loaded.identity.to_dict()
    key = embeddings_key(identity, data_hash)
    manifest_path = edir / "manifest.json"
    manifest: dict[str, Any] = {}
    if manifest_path.is_file() and not force:
        try:
            manifest = read_json(manifest_path)
        except Exception:  # a corrupt manifest just means "recompute"
            manifest = {}
    if manifest.get("key") != key:
        manifest = {"key": key, "parts": {}}
    parts = manifest.setdefault("parts", {})
    timings: dict[str, float] = {}

    if parts.get("images") == key and (edir / "images.npy").is_file():
        log.info("embed[%s]: image embeddings up to date, reused", split)
        image_recs = read_json(edir / "images.json")
    else:
        t = time.perf_counter()
        backend = image_backend_for(loaded, image_backend, ArtifactLayout(out).onnx_dir, torch.get_num_threads())
        vecs, kept, bad = embed_images(loaded, [r["image_path"] for r in image_recs], batch_size, workers,
                                       image_backend=backend)
        for i, reason in bad:
            log.warning("embed[%s]: skipped image %s: %s", split, image_recs[i]["image_id"], reason)
        manifest["skipped_images"] = [{"image_id": image_recs[i]["image_id"], "reason": r} for i, r in bad]
        image_recs = [image_recs[i] for i in kept]
        save_npy_atomic(edir / "images.npy", vecs)
        write_json_atomic(edir / "images.json", image_recs)
        parts["images"] = key
        timings["images_seconds"] = round(time.perf_counter() - t, 2)
        write_json_atomic(manifest_path, manifest)  # commit the images part before the long text part

    kept_ids = {r["image_id"] for r in image_recs}
    text_recs = [r for r in text_recs if r["image_id"] in kept_ids]
    texts_fresh = parts.get("texts") == key and (edir / "texts.npy").is_file()
    if captions and texts_fresh:
        log.info("embed[%s]: caption embeddings up to date, reused", split)
    elif captions:
        t = time.perf_counter()
        tb = text_backend_for(loaded, text_backend, ArtifactLayout(out).onnx_dir, torch.get_num_threads())
        vecs = embed_texts(loaded, [r["caption"] for r in text_recs], batch_size, text_backend=tb)
        save_npy_atomic(edir / "texts.npy", vecs)
        write_json_atomic(edir / "texts.json", text_recs)
        parts["texts"] = key
        timings["texts_seconds"] = round(time.perf_counter() - t, 2)

    reused = not timings
    if not reused or "created" not in manifest:
        manifest.update({
            "split": split,
            "model": identity,
            "data_sha256": data_hash,
            "counts": {"images": len(image_recs), **({"texts": len(text_recs)} if "texts" in parts else {})},
            "dim": identity["embed_dim"],
            "dtype": "float32",
            "normalized": True,
            "created": now_iso(),
            **timings,
        })
        write_json_atomic(manifest_path, manifest)
    return {"split": split, "dir": str(edir), "reused": reused, "counts": manifest["counts"],
            "seconds": round(time.perf_counter() - t0, 2), **timings}


def embeddings_key(identity: dict[str, Any], data_hash: str) -> str:
    """What makes a split's embeddings up to date: the format, the model's identity, the split file."""
    return sha256_json({"format": EMBED_FORMAT, "model": identity, "data": data_hash})


def save_split_embeddings(out: Path, split: str, identity: dict[str, Any], images: np.ndarray, texts: np.ndarray,
                          source: str) -> dict[str, Any]:
    """Write a split's image and caption embeddings made elsewhere (rows in `split_records` order) as
    `embed` writes them for the model `identity`, so `embed` finds them up to date and does not embed
    the split again. `build` uses it for the train split: fine-tuning on cached tower features
    already computes the trained model's train embeddings (`offline.finetune.runner`), which the
    hubness stage would otherwise recompute with a second full pass. `source` says where they came from."""
    out = Path(out)
    image_recs, text_recs, data_hash = split_records(out, split)
    dim = int(identity["embed_dim"])
    images = np.ascontiguousarray(images, dtype=np.float32)
    texts = np.ascontiguousarray(texts, dtype=np.float32)
    if images.shape != (len(image_recs), dim) or texts.shape != (len(text_recs), dim):
        raise ValueError(f"{split}: got {images.shape} images and {texts.shape} captions, expected "
                         f"({len(image_recs)}, {dim}) and ({len(text_recs)}, {dim})")
    edir = embeddings_dir(out, split)
    edir.mkdir(parents=True, exist_ok=True)
    key = embeddings_key(identity, data_hash)
    save_npy_atomic(edir / "images.npy", images)
    write_json_atomic(edir / "images.json", image_recs)
    save_npy_atomic(edir / "texts.npy", texts)
    write_json_atomic(edir / "texts.json", text_recs)
    manifest = {"key": key, "parts": {"images": key, "texts": key}, "skipped_images": [], "split": split,
                "model": identity, "data_sha256": data_hash,
                "counts": {"images": len(image_recs), "texts": len(text_recs)}, "dim": dim, "dtype": "float32",
                "normalized": True, "created": now_iso(), "source": source}
    write_json_atomic(edir / "manifest.json", manifest)  # last: the files above are committed by it
    return {"split": split, "dir": str(edir), "counts": manifest["counts"], "source": source}


def load_image_embeddings(out: Path, split: str) -> dict[str, Any]:
    """A split's image embeddings alone (also when its captions were not embedded)."""
    from clipsearch.manifest import ArtifactError

    edir = embeddings_dir(out, split)
    manifest = read_json(edir / "manifest.json")
    if "images" not in manifest.get("parts", {}) or "counts" not in manifest:
        raise ArtifactError(f"image embeddings in {edir} are missing or incomplete; embed split '{split}'")
    images = np.load(edir / "images.npy")
    if len(images) != manifest["counts"]["images"]:
        raise ArtifactError(f"image embeddings in {edir} do not match their manifest; embed with --force")
    return {"images": images, "manifest": manifest, "manifest_sha256": sha256_file(edir / "manifest.json")}


def load_embeddings(out: Path, split: str) -> dict[str, Any]:
    """Read a split's embeddings and records back; checks they agree with the manifest.

    Besides the arrays and records: `text_to_image`, each caption's image row."""
    from clipsearch.manifest import ArtifactError

    emb = load_image_embeddings(out, split)
    edir = embeddings_dir(out, split)
    if "texts" not in emb["manifest"]["parts"]:
        raise ArtifactError(f"embeddings in {edir} are incomplete; run the embed stage again")
    texts = np.load(edir / "texts.npy")
    image_recs = read_json(edir / "images.json")
    text_recs = read_json(edir / "texts.json")
    if len(emb["images"]) != len(image_recs) or len(texts) != len(text_recs):
        raise ArtifactError(f"embeddings in {edir} do not match their records; run embed with --force")
    row = {r["image_id"]: i for i, r in enumerate(image_recs)}
    text_to_image = np.array([row[r["image_id"]] for r in text_recs], dtype=np.int64)
    return {**emb, "texts": texts, "image_records": image_recs, "text_records": text_recs,
            "text_to_image": text_to_image}
