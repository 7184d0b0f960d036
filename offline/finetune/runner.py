"""Running one or more stages on one model: `finetune` (idempotent, resumable) and `run` (the CLI's).

Each stage starts from the previous one's result. A stage trains on cached tower features when the
model's family caches them and the stage locks all but the last blocks, else on pixels; cached
features come from the starting model, so feature stages must come first, each unlocking at least
as much as the one before.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import torch

from clipsearch.artifacts import ArtifactLayout
from clipsearch.families import family_of
from clipsearch.manifest import ArtifactError, now_iso, read_json, sha256_file, sha256_json, write_json_atomic
from clipsearch.models import LoadedModel, ModelIdentity, load_model, normalize_pretrained
from offline.finetune.config import (FINETUNE_FORMAT, SPLITS, FinetuneConfig, FinetuneError, config_dict,
                                     config_from_args, validate_config)
from offline.finetune.features import FeatureBackend, extract_features
from offline.finetune.inputs import Backend, PixelBackend, SplitData, read_split_data
from offline.finetune.loop import recall_of, val_score
from offline.finetune.optim import resolve_lrs
from offline.finetune.parts import tower_parts, whole_model_parts
from offline.finetune.report import save_checkpoint, stage_dict, summary, write_results
from offline.finetune.soup import soup_stage

log = logging.getLogger(__name__)


def _use_features(loaded: LoadedModel, cfg: FinetuneConfig) -> bool:
    return (cfg.feature_cache and family_of(loaded.model).feature_cache and cfg.image_unlocked() is not None
            and cfg.text_unlocked() is not None)


def _check_stage_order(loaded: LoadedModel, stages: list[tuple[str, FinetuneConfig]]) -> None:
    """Cached features come from the starting model, so a feature stage may only follow stages that
    left its frozen blocks untouched: feature stages first, each unlocking at least as much as before."""
    prev: tuple[int, int] | None = None
    for i, (label, c) in enumerate(stages):
        if not _use_features(loaded, c):
            if any(_use_features(loaded, later) for _, later in stages[i + 1:]):
                raise FinetuneError(f"stage '{label}' trains on pixels, so later stages cannot use cached "
                                    "tower features; put the feature stages first or pass --no-feature-cache.")
            continue
        cur = (c.image_unlocked() or 0, c.text_unlocked() or 0)
        if prev is not None and (cur[0] < prev[0] or cur[1] < prev[1]):
            raise FinetuneError(f"stage '{label}' unlocks fewer blocks than the stage before it; order the "
                                "stages from the most locked to the least.")
        prev = cur
    for label, c in stages:
        if c.mirror and not _use_features(loaded, c):
            raise FinetuneError(f"stage '{label}': --mirror needs the cached-feature path (a model with "
                                "feature_cache whose towers are locked but for their last blocks).")


def _run_key(model_name: str, pretrained: str | None, start_sha: str | None, splits: dict[str, SplitData],
             stages: list[tuple[str, FinetuneConfig]], lrs: list[tuple[float, float]]) -> str:
    return sha256_json({"format": FINETUNE_FORMAT, "model": model_name, "pretrained": pretrained,
                        "start_sha256": start_sha, "splits": {s: d.sha256 for s, d in splits.items()},
                        "stages": [[label, config_dict(c), list(lr)] for (label, c), lr in zip(stages, lrs)]})


def finetune(out: Path, model_name: str, pretrained: str | None, stages: list[tuple[str, FinetuneConfig]],
             name: str, device: str | None = None, workers: int = 2, eval_batch: int = 64,
             force: bool = False, threads: int | None = None) -> dict[str, Any]:
    """Run the stages in order on one model (each starts from the previous one's result) and write
    the checkpoint, the results JSON and the plot. Reuses a finished run with the same key."""
    t0 = time.perf_counter()
    out = Path(out)
    if threads:
        torch.set_num_threads(threads)  # explicit: torch's default (all cores) oversubscribes beside workers
    if not stages:
        raise FinetuneError("no training stages given")
    for _, c in stages:
        validate_config(c)
    splits = {s: read_split_data(out, s) for s in SPLITS}
    for s in ("train", "val"):
        if splits[s].n_images < 2:
            raise FinetuneError(f"The {s} split has {splits[s].n_images} images; fine-tuning needs at least 2.")
    pretrained = normalize_pretrained(pretrained)
    lrs = [resolve_lrs(c, model_name, pretrained) for _, c in stages]
    start_sha = sha256_file(pretrained) if pretrained and Path(pretrained).is_file() else None
    key = _run_key(model_name, pretrained, start_sha, splits, stages, lrs)
    layout = ArtifactLayout(out)
    ckpt = layout.models_dir / f"{name}.pt"
    manifest_path = layout.models_dir / f"{name}.json"
    json_path = layout.results_dir / f"finetune_{name}.json"
    if not force and manifest_path.is_file() and ckpt.is_file() and json_path.is_file():
        try:
            manifest = read_json(manifest_path)
        except ArtifactError:
            manifest = {}
        if manifest.get("key") == key and manifest.get("checkpoint_sha256") == sha256_file(ckpt):
            log.info("finetune: %s is up to date for these splits and options, reused", ckpt)
            record = read_json(json_path)
            return summary(record, reused=True, seconds=time.perf_counter() - t0)

    torch.manual_seed(stages[0][1].seed)
    loaded = load_model(model_name, pretrained, device)
    model = loaded.model
    blocks_wanted = any(c.image_unlocked() is not None or c.text_unlocked() is not None or c.feature_dropout > 0
                        for _, c in stages)
    parts = tower_parts(model) if blocks_wanted or family_of(model).heads_apart else whole_model_parts(model)
    state_dir = out / "finetune" / name
    if force and state_dir.is_dir():
        for f in state_dir.glob("*.pt"):
            f.unlink()

    feature_stages = [c for _, c in stages if _use_features(loaded, c)]
    _check_stage_order(loaded, stages)
    feats: dict[str, Any] = {}
    timings: dict[str, float] = {}
    if feature_stages:
        t = time.perf_counter()
        wanted = {s: d for s, d in splits.items() if s != "test" or any(c.eval_test for _, c in stages)}
        feats = extract_features(out, loaded, wanted, max(c.image_unlocked() or 0 for c in feature_stages),
                                 max(c.text_unlocked() or 0 for c in feature_stages), workers, eval_batch,
                                 force=force, mirror=any(c.mirror for c in feature_stages))
        timings["features"] = round(time.perf_counter() - t, 2)
    backends: dict[tuple[int, int, bool], FeatureBackend] = {}

    def backend_for(c: FinetuneConfig) -> Backend:
        if not _use_features(loaded, c):
            return PixelBackend(loaded, splits, workers, eval_batch)
        k = (c.image_unlocked() or 0, c.text_unlocked() or 0, c.mirror)
        if k not in backends:  # the frozen middle blocks run once per backend
            backends[k] = FeatureBackend(model, feats, splits, *k[:2], loaded.device, mirror=c.mirror)
        return backends[k]

    eval_test = any(c.eval_test for _, c in stages)
    test_start = None
    if eval_test:
        test_start = recall_of(backend_for(stages[0][1]), splits["test"])[0]
    results = []
    for i, ((label, c), lr) in enumerate(zip(stages, lrs)):
        stage_key = sha256_json({"run": key, "stage": i})
        backend = backend_for(c)
        res = soup_stage(model, backend, splits, c, parts, lr, state_dir / f"{i}-{label}.pt", stage_key,
                         loaded.device, label=label)
        results.append((label, res))
        timings[f"stage_{label}"] = res.seconds
    # the last stage only ever improves on val over its start (epoch 0 and α = 0 are candidates), so
    # the model now holds the best weights seen across all stages
    final_val = results[-1][1].final_val
    test_final = recall_of(backend_for(stages[-1][1]), splits["test"])[0] if eval_test else None

    sha = save_checkpoint(model, ckpt)
    timings.update(_save_train_embeddings(out, model_name, ckpt, sha, backend_for(stages[-1][1]), name))
    history = [h for _, r in results for h in r.history]
    record = {
        "name": name,
        "model": model_name,
        "pretrained": pretrained,
        "checkpoint": str(ckpt),
        "checkpoint_sha256": sha,
        "splits": {s: {"images": d.n_images, "captions": len(d.captions), "sha256": d.sha256}
                   for s, d in splits.items()},
        "stages": [stage_dict(r, label) for label, r in results],
        "history": history,
        "val": {"start": results[0][1].start_val, "final": final_val, "final_score": round(val_score(final_val), 3)},
        "test": {"start": test_start, "final": test_final},
        "device": str(loaded.device),
        "threads": torch.get_num_threads(),
        "timings_seconds": {**timings, "total": round(time.perf_counter() - t0, 2)},
        "key": key,
        "created": now_iso(),
    }
    json_out, png_out = write_results(out, name, record)
    write_json_atomic(manifest_path, {"key": key, "checkpoint_sha256": sha, "model": model_name,
                                      "pretrained": pretrained, "results": str(json_out), "created": now_iso()})
    for f in state_dir.glob("*.pt"):  # the run is complete: resume states are no longer needed
        f.unlink()
    return summary(record, reused=False, seconds=time.perf_counter() - t0)


def _save_train_embeddings(out: Path, model_name: str, ckpt: Path, sha: str, backend: Backend,
                           name: str) -> dict[str, float]:
    """The trained model's train-split embeddings from the cached features (the frozen fronts did not
    change, so the trained ends on them are the model's own embeddings, within float tolerance),
    written as `offline embed` writes them for this checkpoint, so the hubness stage's query banks
    need no second pass over train. Keyed by the identity `load_model(ckpt, image_tta)` gives, with
    image_tta "mirror" exactly when the backend mirrors: a build that loads the checkpoint otherwise
    does not match the key and embeds train itself."""
    if not isinstance(backend, FeatureBackend) or "train" not in backend.feats:
        return {}
    from offline.embed import save_split_embeddings

    t = time.perf_counter()
    images, texts = backend.embed("train")
    identity = ModelIdentity(model_name, str(Path(ckpt).expanduser().resolve()), sha, int(images.shape[1]),
                             "mirror" if backend.mirror else None)
    save_split_embeddings(out, "train", identity.to_dict(), images, texts,
                          source=f"finetune {name}: cached train features through the trained model")
    log.info("finetune: train embeddings of the trained model written from the feature cache (%d images, "
             "%d captions) in %.1f s", len(images), len(texts), time.perf_counter() - t)
    return {"train_embeddings": round(time.perf_counter() - t, 2)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """`python -m offline finetune`: one stage with the options given."""
    cfg = config_from_args(args)
    name = args.name or f"{args.model}-ft"
    return finetune(args.out, args.model, args.pretrained, [("finetune", cfg)], name, device=args.device,
                    workers=args.workers, eval_batch=args.batch_size, force=args.force,
                    threads=args.threads or None)

