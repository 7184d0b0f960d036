"""The `ingest` stage: a folder, a record file or a Flickr8k layout becomes (or updates) a collection.

    python -m offline ingest ~/Pictures --collection photos

Steps: read the source (`offline/sources.py`), plan what changed against the collection's catalog
(`clipsearch/collections.py`), delete what is gone, embed what is new or changed with the project's
model, committing every few hundred images (an interrupted ingest resumes from the last commit
without embedding those again), apply the hubness correction to captions where the project chose
one for this model, save the HNSW snapshot of a large collection, and write the collection's report.
Ingesting never trains or changes the model.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from clipsearch.artifacts import ArtifactLayout, CollectionLayout
from clipsearch.collection import Collection, load_banks
from clipsearch.collections import FileStat, IngestPlan, plan_ingest, relink_known, settle_bad_files
from clipsearch.encoder import ClipEncoder, build_encoder
from clipsearch.hubness import Banks
from clipsearch.index import IndexParams
from clipsearch.manifest import now_iso, write_json_atomic
from clipsearch.media import is_owned_media
from clipsearch.models import LoadedModel
from clipsearch.onnx.runtime import release_memory, return_large_frees
from clipsearch.store import Catalog, FaissStore, NewItem
from clipsearch.store.bad_files import read_bad_files
from clipsearch.store.catalog import ItemState
from offline.embed import ImageFiles, collate_images
from offline.layouts import IMAGE_SUFFIXES, R_CORRUPT, DataError
from offline.prefetch import DECODE_THREADS, threaded_batches
from offline.reuse import KnownVectors
from offline.sources import Source, SourceItem, read_source

log = logging.getLogger(__name__)

COMMIT_EVERY = 256  # images per catalog transaction: what an interrupted ingest can lose


def ingest(source: str | Path, out: str | Path, collection: str, loaded: LoadedModel, *,
           batch_size: int = 64, workers: int = 0, force: bool = False, image_backend: str = "auto",
           text_backend: str = "onnx", params: IndexParams | None = None,
           known: KnownVectors | None = None, hold: Callable[[SourceItem], bool] | None = None,
           encoder: ClipEncoder | None = None, max_tries: int = 1, snapshot: bool = True,
           release_torch: bool = False) -> dict[str, Any]:
    """`known`: vectors already made for some of the inputs (`offline/reuse.py`; `build` passes its
    split embeddings), used instead of embedding them again. The folder watcher (`offline/watch.py`)
    passes `hold` (files still being written: left as they are, neither added nor removed), its own
    long-lived `encoder`, `max_tries` (decode failures retried before a file is parked as bad) and
    `snapshot=False` (no HNSW snapshot after every small batch). `release_torch`: `loaded` is this
    call's alone, so the torch towers it will not run (served by ONNX Runtime / bf16, or not needed)
    are freed once the encoder is built (`ClipEncoder.release_torch_towers`)."""
    t0 = time.perf_counter()
    layout = ArtifactLayout(Path(out))
    coll = layout.collection(collection)
    log.info("── ingest: reading %s", source)
    src = read_source(source)
    held = {item.image_id for item in src.items if hold(item)} if hold is not None else set()
    present = {item.image_id for item in src.items}
    if held:
        src.items = [item for item in src.items if item.image_id not in held]
    identity = loaded.identity.to_dict()
    existed = coll.catalog.is_file()
    if not src.items and not existed and not held:
        raise DataError(f"no images found in {src.root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))} "
                        "files in it and its subfolders); nothing was written")
    if existed and not force:
        with Catalog(coll.catalog, readonly=True) as cat:
            old_model = cat.model()
        if old_model is not None and old_model != identity:
            raise DataError(f"collection {collection!r} was embedded with {old_model.get('model')} "
                            f"({old_model.get('pretrained')}), not {identity['model']} "
                            f"({identity['pretrained']}); pass --force to re-embed it with this model")
    if force and existed:
        _remove_catalog(coll)
        existed = False

    catalog = Catalog(coll.catalog)
    try:
        if catalog.model() is None:
            catalog.set_model(identity, identity["embed_dim"])
        states = catalog.states()
        plan = plan_ingest(src.items, states, bad=read_bad_files(catalog), max_tries=max_tries)
        # items uploaded to the running service (media the collection owns) are not the folder's to remove
        plan.removed = [i for i in plan.removed if not is_owned_media(states[i].path) and i not in held]
        log.info("── ingest %s: %s", collection, plan.summary())
        skipped = list(src.skipped) + [{"kind": "image", "reason": "missing_image", "image_id": i, "detail": why}
                                       for i, why in plan.missing]
        skipped += [{"kind": "image", "reason": R_CORRUPT, "image_id": item.image_id,
                     "detail": f"bad (unchanged since {b.last_tried}): {b.reason}"} for item, _, b in plan.bad_unchanged]
        # the one write path: embedded items get their offsets from the banks and commit through the store
        store = FaissStore(collection, catalog, coll, params or IndexParams())
        banks = load_banks(layout.root, identity)
        target = Collection(store, banks)
        relink_known(catalog, plan)  # moves, renames and copies: the vectors they already have
        removed = store.delete(plan.removed)
        threads = torch.get_num_threads()
        needs_text = bool(plan.recaptioned) or any(item.captions for item, _ in plan.to_embed)
        # a folder without captions never encodes a text: no text session to build and check
        encoder = encoder or build_encoder(
            loaded, batch_size=batch_size, cache_dir=layout.onnx_dir, threads=threads,
            image=image_backend if plan.to_embed else None, text=text_backend if needs_text else None)
        if plan.to_embed:
            return_large_frees()  # decoded pixel tensors go back to the OS when freed
        if release_torch:
            freed = encoder.release_torch_towers(
                image=encoder.image_backend is not None or not plan.to_embed,
                text=encoder.text_backend is not None or not needs_text)
            release_memory()
            log.info("ingest: torch towers released (their work runs elsewhere or not at all): %s",
                     ", ".join(freed) or "none")
        t_embed = time.perf_counter()
        embedded, bad = _embed_items(target, encoder, loaded, plan.to_embed, batch_size, workers,
                                     known or KnownVectors())
        skipped += bad
        relink_known(catalog, plan, after_embedding=True)  # copies of files first seen in this run
        bad_files = settle_bad_files(catalog, plan, {b["image_id"]: b["detail"] for b in bad}, present)
        _recaption(catalog, target, encoder, plan.recaptioned, batch_size)
        _restate(catalog, plan.restated)
        embed_seconds = time.perf_counter() - t_embed
        if known is not None and (known.reused_images or known.reused_texts):
            log.info("ingest %s: reused %d image and %d caption vectors of the split embeddings", collection,
                     known.reused_images, known.reused_texts)
        hubness = _apply_hubness(catalog, banks)
        n_items, n_captions = catalog.count()
        if n_items == 0:
            if not existed and not held:
                catalog.close()
                _remove_catalog(coll)
                _write_report(coll, src, plan, skipped, {"images": 0, "captions": 0}, identity, None, t0, 0.0)
                raise DataError(f"none of the {len(src.items)} images in {src.root} could be read; nothing "
                                f"was indexed (each one's reason is in {coll.report})")
            log.warning("collection %s is now empty: every item was removed or unreadable", collection)
        index_kind, saved = "snapshot not saved (watch)", {}
        if snapshot:
            store.refresh()  # the relinks above went to the catalog directly
            saved, index_kind = store.save_snapshot(), store.describe()["index"]["images"]
        counts = {"images": n_items, "captions": n_captions}
        report = _write_report(coll, src, plan, skipped, counts, identity, hubness, t0, embed_seconds)
    finally:
        catalog.close()
    for item in skipped[:8]:
        log.warning("skipped %s: %s (%s)", item.get("image_id") or item.get("where"), item["reason"],
                    item.get("detail", ""))
    if len(skipped) > 8:
        log.warning("... %d more skipped items in %s", len(skipped) - 8, coll.report)
    reused = known.reused_images if known is not None else 0
    # vectors copied from the split embeddings were not encoded here: the summary says which is which
    added = f"{embedded - reused} embedded, {reused} reused" if reused else f"{embedded} embedded"
    print(f"ingest {collection}: {n_items} images, {n_captions} captions "
          f"({added}, {removed} removed, {len(skipped)} skipped) in "
          f"{time.perf_counter() - t0:.1f} s; index: {index_kind}", flush=True)
    return {"collection": collection, "dir": str(coll.dir), "source": str(src.root), "kind": src.kind,
            **report["changes"], "embedded": embedded, "images": n_items, "captions": n_captions,
            "skipped": len(skipped), "snapshot": saved, "report": str(coll.report),
            "seconds": report["seconds"], "bad_files": len(bad_files), "held": len(held)}


def _remove_catalog(coll: CollectionLayout) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(str(coll.catalog) + suffix).unlink(missing_ok=True)
    shutil.rmtree(coll.index_dir, ignore_errors=True)


def _chunks(seq: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def _encode_captions(encoder: ClipEncoder, items: Sequence[SourceItem], batch_size: int,
                     known: KnownVectors | None = None) -> list[np.ndarray | None]:
    texts = [c for item in items for c in item.captions]
    flat = np.zeros((len(texts), encoder.dim), np.float32)
    todo = []
    for j, text in enumerate(texts):
        v = known.text(text) if known is not None else None
        if v is None:
            todo.append(j)
        else:
            flat[j] = v
    for i in range(0, len(todo), batch_size):
        rows = todo[i:i + batch_size]
        flat[rows] = encoder.encode_texts([texts[j] for j in rows])
    out, at = [], 0
    for item in items:
        n = len(item.captions)
        out.append(flat[at:at + n] if n else None)
        at += n
    return out


def _new_item(item: SourceItem, stat: FileStat, vector: np.ndarray, caption_vectors: np.ndarray | None
              ) -> NewItem:
    return NewItem(item.image_id, str(item.path), vector, item.captions, caption_vectors, item.metadata,
                   stat.size, stat.mtime_ns, stat.sha256, item.caption_ids)


def _put(target: Collection, todo: Sequence[tuple[SourceItem, FileStat]], vectors: Sequence[np.ndarray],
         cap_vecs: list[np.ndarray | None]) -> None:
    target.add_embedded([_new_item(item, stat, vec, cv) for (item, stat), vec, cv in zip(todo, vectors, cap_vecs)])


def _embed_items(target: Collection, encoder: ClipEncoder, loaded: LoadedModel,
                 todo: list[tuple[SourceItem, FileStat]], batch_size: int, workers: int,
                 known: KnownVectors) -> tuple[int, list[dict[str, Any]]]:
    """Embed images (decoded beside the forward pass) and their captions; commit every COMMIT_EVERY.
    Images `known` already has a vector for are not decoded: their vectors are copied."""
    if not todo:
        return 0, []
    reused, rest = [], []
    for item, stat in todo:
        vec = known.image(item.path) if len(known) else None
        if vec is None:
            rest.append((item, stat))
        else:
            reused.append((item, stat, vec))
    for chunk in _chunks(reused, COMMIT_EVERY):
        cap_vecs = _encode_captions(encoder, [it for it, _, _ in chunk], batch_size, known)
        _put(target, [(it, st) for it, st, _ in chunk], [vec for _, _, vec in chunk], cap_vecs)
    done = len(reused)
    todo = rest
    if not todo:
        return done, []
    files = ImageFiles([str(item.path) for item, _ in todo], loaded.preprocess)
    if workers > 0:
        loader: Any = DataLoader(files, batch_size=batch_size, num_workers=workers, collate_fn=collate_images,
                                 prefetch_factor=2)  # batches decoded ahead per worker: each is ~45 MB of pixels
    else:  # decode in threads of this process, overlapped with the forward pass, a bounded few batches ahead
        loader = threaded_batches(files, batch_size, threads=DECODE_THREADS, collate=collate_images)
    pending: list[tuple[int, np.ndarray]] = []
    bad: list[dict[str, Any]] = []

    def commit() -> None:
        nonlocal done
        items = [todo[i][0] for i, _ in pending]
        cap_vecs = _encode_captions(encoder, items, batch_size, known)
        _put(target, [todo[i] for i, _ in pending], [vec for _, vec in pending], cap_vecs)
        done += len(pending)
        pending.clear()

    with tqdm(total=len(todo), desc="embedding images", unit="img") as bar:
        for idx, pixels, errs in loader:
            if pixels is not None:
                vecs = encoder.encode_pixels(pixels).cpu().numpy()
                pending.extend(zip(idx, vecs))
            for i, reason in errs:
                bad.append({"kind": "image", "reason": R_CORRUPT, "image_id": todo[i][0].image_id,
                            "detail": reason})
            bar.update(len(idx) + len(errs))
            if len(pending) >= COMMIT_EVERY:
                commit()
        if pending:
            commit()
    return done, bad


def _recaption(catalog: Catalog, target: Collection, encoder: ClipEncoder,
               todo: list[tuple[SourceItem, FileStat]], batch_size: int) -> None:
    # many items' captions in one catalog transaction, each keeping its source's caption ids: the
    # store contract replaces one item's captions at a time; the offsets are the collection's all the same
    for chunk in _chunks(todo, COMMIT_EVERY):
        items = [item for item, _ in chunk]
        cap_vecs = _encode_captions(encoder, items, batch_size)
        cap_off = target.caption_offsets(cap_vecs)
        catalog.replace_captions(NewItem(i.image_id, str(i.path), np.zeros(encoder.dim, np.float32), i.captions,
                                         cv, i.metadata, caption_ids=i.caption_ids, caption_offsets=co)
                                 for i, cv, co in zip(items, cap_vecs, cap_off))
    _restate(catalog, todo)


def _restate(catalog: Catalog, todo: list[tuple[SourceItem, FileStat]]) -> None:
    if todo:
        catalog.update_states(ItemState(item.image_id, str(item.path), st.size, st.mtime_ns, st.sha256, "",
                                        item.metadata) for item, st in todo)


def _apply_hubness(catalog: Catalog, banks: Banks) -> dict[str, Any] | None:
    """Make every row's offsets those of `banks`. New rows got theirs when written; all rows are
    recomputed only when the correction itself changed (another β, k or bank, or none any more), which
    makes the derived index rebuild. Returns the image → caption correction's record (or None)."""
    for gallery, recorded, rows_vectors, setter in (
            ("captions", catalog.hubness(), catalog.caption_vectors, catalog.set_caption_offsets),
            ("images", catalog.hubness_images(), catalog.image_vectors, catalog.set_image_offsets)):
        correction = getattr(banks, gallery)
        info = correction.info if correction is not None else None
        if (recorded or None) == info:
            continue
        rows, vectors = rows_vectors()
        offsets = correction.offsets(vectors) if correction is not None and len(rows) else np.zeros(0, np.float32)
        setter(rows if correction is not None else [], np.asarray(offsets, np.float32), info)
    return banks.captions.info if banks.captions is not None else None


def _write_report(coll: CollectionLayout, src: Source, plan: IngestPlan, skipped: list[dict[str, Any]],
                  counts: dict[str, int], model: dict[str, Any], hubness: dict[str, Any] | None, t0: float,
                  embed_seconds: float) -> dict[str, Any]:
    reasons: dict[str, int] = {}
    for item in skipped:
        reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
    report = {"collection": coll.name, "source": str(src.root), "kind": src.kind, "model": model,
              "counts": counts, "source_items": len(src.items), "changes": plan.counts(),
              "skipped_by_reason": reasons, "skipped": skipped, "hubness": hubness,
              "embed_seconds": round(embed_seconds, 2), "seconds": round(time.perf_counter() - t0, 2),
              "created": now_iso()}
    write_json_atomic(coll.report, report)
    return report
