"""The ``prepare`` stage: validate a Flickr8k-style corpus and write image-disjoint splits.

The layouts it reads (original, Kaggle, a generic ``.jsonl``/``.csv``) live in ``offline/layouts.py``.

Output (``<out>/splits/``): ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` with one record per
caption (``image_id``, ``image_path``, ``caption_id``, ``caption``), plus
``prepare_manifest.json`` for idempotence; ``<out>/validation_report.json`` lists every skipped
item with its reason. Bad items are skipped, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from tqdm import tqdm

from clipsearch.artifacts import ArtifactLayout
from clipsearch.images import MAX_IMAGE_PIXELS, ImageDecodeError, decode_image_with_mode
from clipsearch.manifest import atomic_write_text, json_lines, sha256_file, write_json_atomic
from offline.layouts import (IMAGE_SUFFIXES, R_BAD_ID, R_CORRUPT, R_DUP, R_DUP_ID, R_EMPTY, R_MISSING, READERS,
                             SPLIT_LIST_FILES, SPLITS, CaptionRecord, DataError, Layout, detect_layout,
                             read_generic, read_list, resolve_layout)

__all__ = ["DataError", "SPLITS", "detect_layout", "prepare", "read_split"]

#: Bump when the output format or validation rules change, so old outputs are not reused.
PREPARE_FORMAT = 2  # 2: repeated captions of an image are kept (noted), as published Flickr8k results count them

# --------------------------------------------------------------------------------------------
# Fingerprint for idempotence


def _inputs_fingerprint(layout: Layout) -> str:
    """Hash of the caption file, split lists and the image listing (names + sizes, not contents)."""
    h = hashlib.sha256()
    h.update(f"captions {sha256_file(layout.caption_file)}\n".encode())
    for s, p in sorted((layout.split_lists or {}).items()):
        h.update(f"list {s} {sha256_file(p)}\n".encode())
    if layout.image_dir is not None:
        entries = []
        with os.scandir(layout.image_dir) as it:
            for e in it:
                if e.is_file():
                    entries.append((e.name, e.stat().st_size))
        for name, size in sorted(entries):
            h.update(f"{name}\t{size}\n".encode("utf-8", "surrogateescape"))
    else:
        # Generic: the referenced images can be anywhere, so list exactly those.
        skipped: list[dict] = []
        paths = sorted({str(c.image_path) for c in read_generic(layout, skipped) if c.image_path})
        for p in paths:
            try:
                size = os.stat(p).st_size
            except OSError:
                size = -1
            h.update(f"{p}\t{size}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Validation


@dataclass
class _ImageResult:
    ok: bool
    mode: str | None = None
    size: tuple[int, int] | None = None
    error: str | None = None


def _check_image(path: Path) -> _ImageResult:
    try:
        im, mode = decode_image_with_mode(path, MAX_IMAGE_PIXELS)
    except ImageDecodeError as exc:
        return _ImageResult(False, error=str(exc))
    size = im.size
    im.close()
    return _ImageResult(True, mode=mode, size=size)


def _decode_all(paths: Sequence[Path], workers: int) -> list[_ImageResult]:
    bar = dict(total=len(paths), desc="decoding images", unit="img", disable=None, leave=False)
    if workers <= 1:
        return [_check_image(p) for p in tqdm(paths, **bar)]
    # PIL releases the GIL while decoding, so threads give real parallelism here.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(_check_image, paths), **bar))


@dataclass
class _Validated:
    captions: dict[str, list[CaptionRecord]]          # image_id -> kept captions, in file order
    image_paths: dict[str, Path]
    skipped: list[dict]
    reasons: Counter[str] = field(default_factory=Counter)
    modes: Counter[str] = field(default_factory=Counter)
    sizes: Counter[str] = field(default_factory=Counter)
    caption_records: int = 0
    images_referenced: int = 0
    images_without_captions: list[str] = field(default_factory=list)
    images_without_usable_captions: list[str] = field(default_factory=list)
    notes: list[dict] = field(default_factory=list)  # kept, but worth a look (e.g. repeated captions)


def _normalize(text: str) -> str:
    return " ".join(text.split())


def _validate(layout: Layout, workers: int) -> _Validated:
    skipped: list[dict] = []
    raw = READERS[layout.kind](layout, skipped)
    n_malformed = len(skipped)

    by_image: dict[str, list[CaptionRecord]] = {}
    paths: dict[str, Path | None] = {}
    for c in raw:
        by_image.setdefault(c.image_id, []).append(c)
        paths.setdefault(c.image_id, c.image_path)

    # Image-level checks first: a caption is only worth checking if its image is usable.
    usable: dict[str, Path] = {}
    bad_images: list[tuple[str, str, str]] = []        # (image_id, reason, detail)
    to_decode: list[str] = []
    for image_id, p in paths.items():
        if p is None:
            bad_images.append((image_id, R_BAD_ID, "caption id does not name an image file"))
        elif not p.is_file():
            bad_images.append((image_id, R_MISSING, "image file not found"))
        else:
            to_decode.append(image_id)
    results = _decode_all([paths[i] for i in to_decode], workers)  # type: ignore[misc]
    modes: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for image_id, res in zip(to_decode, results):
        if res.ok:
            usable[image_id] = paths[image_id]  # type: ignore[assignment]
            modes[res.mode or "?"] += 1
            sizes[f"{res.size[0]}x{res.size[1]}" if res.size else "?"] += 1
        else:
            bad_images.append((image_id, R_CORRUPT, res.error or "cannot decode"))
    for image_id, reason, detail in sorted(bad_images):
        caps = by_image[image_id]
        skipped.append({"kind": "image", "reason": reason, "image_id": image_id,
                        "captions_dropped": len(caps), "where": caps[0].where, "detail": detail})

    kept: dict[str, list[CaptionRecord]] = {}
    notes: list[dict] = []
    seen_ids: set[str] = set()
    for image_id in by_image:
        if image_id not in usable:
            continue
        seen_text: dict[str, str] = {}
        for c in by_image[image_id]:
            text = _normalize(c.caption)
            item = {"kind": "caption", "image_id": image_id, "caption_id": c.caption_id,
                    "where": c.where}
            if not text:
                skipped.append({**item, "reason": R_EMPTY, "detail": "caption is empty"})
                continue
            if c.caption_id in seen_ids:
                skipped.append({**item, "reason": R_DUP_ID, "detail": "caption id seen before"})
                continue
            # Two annotators writing the same sentence for one image is a real annotation: it is
            # kept (Flickr8k's test split has 5,000 captions in published results) and noted.
            key = text.casefold()
            if key in seen_text:
                notes.append({**item, "reason": R_DUP, "caption": text,
                              "detail": f"same text as {seen_text[key]} (kept)"})
            else:
                seen_text[key] = c.caption_id
            seen_ids.add(c.caption_id)
            kept.setdefault(image_id, []).append(CaptionRecord(image_id, c.image_path, c.caption_id,
                                                          text, c.where))
    # Images whose every caption was dropped cannot be retrieved by text: leave them out.
    no_captions_left = sorted(i for i in usable if i not in kept)
    usable = {i: p for i, p in usable.items() if i in kept}

    reasons: Counter[str] = Counter(s["reason"] for s in skipped)
    v = _Validated(kept, usable, skipped, reasons, modes, sizes,
                   caption_records=len(raw) + n_malformed, images_referenced=len(paths),
                   images_without_usable_captions=no_captions_left, notes=notes)
    if layout.image_dir is not None:
        on_disk = {e.name for e in os.scandir(layout.image_dir)
                   if e.is_file() and not e.name.startswith(".")
                   and Path(e.name).suffix.lower() in IMAGE_SUFFIXES}
        v.images_without_captions = sorted(on_disk - set(paths))
    return v


# --------------------------------------------------------------------------------------------
# Splitting


def _check_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    try:
        r = tuple(float(x) for x in ratios)
    except (TypeError, ValueError):
        raise DataError(f"ratios must be three numbers, got {ratios!r}.") from None
    if len(r) != 3 or any(x < 0 for x in r) or abs(sum(r) - 1.0) > 1e-6:
        raise DataError(f"ratios must be three non-negative numbers summing to 1, got {ratios!r}.")
    return r  # type: ignore[return-value]


def _random_split(image_ids: Iterable[str], ratios: tuple[float, float, float],
                  seed: int) -> dict[str, list[str]]:
    ids = sorted(image_ids)
    random.Random(seed).shuffle(ids)
    n = len(ids)
    n_train = round(n * ratios[0])
    n_val = min(round(n * ratios[1]), n - n_train)
    return {"train": sorted(ids[:n_train]), "val": sorted(ids[n_train:n_train + n_val]),
            "test": sorted(ids[n_train + n_val:])}


def _official_split(layout: Layout, usable: Iterable[str]) -> tuple[dict[str, list[str]], dict]:
    if layout.split_lists is None:
        raise DataError(
            f"split='official' needs the lists {', '.join(SPLIT_LIST_FILES.values())} next to the "
            f"captions (or in Flickr8k_text/), and the {layout.kind} dataset has none; "
            "use split='random'.")
    usable_set = set(usable)
    assigned: dict[str, str] = {}
    listed_unusable: dict[str, list[str]] = {s: [] for s in SPLITS}
    in_several: list[str] = []
    for s in SPLITS:
        for image_id in read_list(layout.split_lists[s]):
            if image_id in assigned:
                if assigned[image_id] != s:
                    in_several.append(image_id)   # keeps its first split: splits stay disjoint
                continue
            if image_id in usable_set:
                assigned[image_id] = s
            else:
                listed_unusable[s].append(image_id)
    splits = {s: sorted(i for i, t in assigned.items() if t == s) for s in SPLITS}
    extra = {"unassigned_images": sorted(usable_set - assigned.keys()),
             "split_list_entries_not_usable": {s: sorted(set(v))
                                               for s, v in listed_unusable.items()},
             "images_in_several_split_lists": sorted(set(in_several))}
    return splits, extra


# --------------------------------------------------------------------------------------------
# Public entry points


def _split_records(v: _Validated, ids: list[str]) -> list[dict]:
    return [{"image_id": i, "image_path": str(v.image_paths[i]), "caption_id": c.caption_id,
             "caption": c.caption} for i in ids for c in v.captions[i]]


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _summary_text(report: dict, result: dict) -> str:
    c = report["counts"]
    lines = [f"prepare: {report['layout']} layout, split={report['split']}, data={report['data']}",
             f"  captions: {c['caption_records']} read, {c['captions_kept']} kept, "
             f"{c['caption_records'] - c['captions_kept']} dropped",
             f"  images:   {c['images_referenced']} referenced, {c['images_kept']} kept"]
    if c["skipped_by_reason"]:
        dropped_with = Counter()
        for item in report["skipped"]:
            dropped_with[item["reason"]] += item.get("captions_dropped", 0)
        lines.append("  skipped:  " + ", ".join(
            f"{r} {n}" + (f" ({dropped_with[r]} captions)" if dropped_with[r] else "")
            for r, n in sorted(c["skipped_by_reason"].items())))
    if c.get("notes_by_reason"):
        lines.append("  kept, noted: " + ", ".join(f"{r} {n}" for r, n in sorted(c["notes_by_reason"].items())))
    lines.append("  modes:    " + ", ".join(f"{m} {n}" for m, n in c["image_modes"].items()))
    if c["images_without_captions"]:
        lines.append(f"  images on disk without captions (ignored): {c['images_without_captions']}")
    if c.get("unassigned_images"):
        lines.append(f"  usable images in no split list (ignored): {c['unassigned_images']}")
    for item in report["skipped"][:8]:
        ident = item.get("caption_id") or item.get("image_id") or item.get("where")
        lines.append(f"    - {item['reason']}: {ident} ({item['detail']})")
    if len(report["skipped"]) > 8:
        lines.append(f"    ... {len(report['skipped']) - 8} more in the report")
    for s in SPLITS:
        lines.append(f"  {s:<5} {result['counts'][s]['images']:>6} images "
                     f"{result['counts'][s]['captions']:>7} captions -> {result['splits'][s]}")
    lines.append(f"  report: {result['report']}")
    return "\n".join(lines)


def prepare(data: Path, out: Path, split: str = "official",
            ratios: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0, force: bool = False,
            workers: int = 2) -> dict:
    """Validate a dataset and write ``<out>/splits/{train,val,test}.jsonl``.

    Args:
        data: dataset folder (original or Kaggle layout) or a generic ``.jsonl``/``.csv`` file.
        out: output folder; receives ``splits/`` and ``validation_report.json``.
        split: ``"official"`` (the Flickr8k 6000/1000/1000 lists) or ``"random"``.
        ratios: train/val/test fractions of images for ``split="random"``.
        seed: shuffling seed for ``split="random"``.
        force: redo the work even if the outputs match the inputs.
        workers: decoding threads.

    Returns:
        A summary: ``counts`` per split (images, captions), ``splits`` paths, ``report`` path,
        ``layout``, and ``up_to_date`` (True when existing outputs were reused).

    Raises:
        DataError: wrong path, unrecognised layout, bad ``split``/``ratios``, or
            ``split="official"`` without split lists.
    """
    t0 = time.perf_counter()
    if split not in ("official", "random"):
        raise DataError(f"split must be 'official' or 'random', got {split!r}.")
    r = _check_ratios(ratios)
    layout = resolve_layout(Path(data))
    if split == "official" and layout.split_lists is None:
        _official_split(layout, ())  # raises the explanatory DataError before any work
    out = Path(out).expanduser().resolve()
    artifacts = ArtifactLayout(out)
    split_dir = artifacts.splits_dir
    report_path = artifacts.validation_report
    manifest_path = split_dir / "prepare_manifest.json"
    split_paths = {s: artifacts.split_file(s) for s in SPLITS}

    inputs = {"format": PREPARE_FORMAT, "data": str(layout.caption_file if layout.kind == "generic"
                                                    else layout.root),
              "layout": layout.kind, "split": split,
              "ratios": list(r) if split == "random" else None,
              "seed": seed if split == "random" else None,
              "max_image_pixels": MAX_IMAGE_PIXELS,
              "inputs_sha256": _inputs_fingerprint(layout)}

    if not force and manifest_path.is_file() and report_path.is_file() and all(
            p.is_file() for p in split_paths.values()):
        try:
            old = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = None
        if isinstance(old, dict) and old.get("inputs") == inputs and "result" in old:
            result = {**old["result"], "up_to_date": True}
            print(f"prepare: outputs in {split_dir} are up to date for these inputs; "
                  "skipping (use force=True to redo).")
            return result

    v = _validate(layout, workers)
    extra: dict[str, Any] = {}
    if split == "official":
        assignment, extra = _official_split(layout, v.image_paths)
    else:
        assignment = _random_split(v.image_paths, r, seed)

    # A half-written run must never look complete: drop the old manifest before the outputs.
    manifest_path.unlink(missing_ok=True)
    counts = {}
    for s in SPLITS:
        recs = _split_records(v, assignment[s])
        atomic_write_text(split_paths[s], _jsonl(recs))
        counts[s] = {"images": len(assignment[s]), "captions": len(recs)}

    report = {
        "data": inputs["data"], "layout": layout.kind, "split": split,
        "ratios": inputs["ratios"], "seed": inputs["seed"],
        "counts": {
            "caption_records": v.caption_records,
            "captions_kept": sum(len(c) for c in v.captions.values()),
            "captions_in_splits": sum(c["captions"] for c in counts.values()),
            "images_referenced": v.images_referenced,
            "images_kept": len(v.image_paths),
            "images_in_splits": sum(c["images"] for c in counts.values()),
            "skipped_items": len(v.skipped),
            "skipped_by_reason": dict(sorted(v.reasons.items())),
            "notes_by_reason": dict(sorted(Counter(n["reason"] for n in v.notes).items())),
            "image_modes": dict(v.modes.most_common()),
            "image_sizes": dict(v.sizes.most_common(10)),
            "images_without_captions": len(v.images_without_captions),
            "images_without_usable_captions": len(v.images_without_usable_captions),
            "unassigned_images": len(extra.get("unassigned_images", [])),
            "splits": counts,
        },
        "skipped": v.skipped,
        "notes": v.notes,
        "images_without_captions": v.images_without_captions,
        "images_without_usable_captions": v.images_without_usable_captions,
        **extra,
    }
    write_json_atomic(report_path, report)
    result = {"layout": layout.kind, "split": split, "counts": counts,
              "splits": {s: str(p) for s, p in split_paths.items()}, "report": str(report_path),
              "skipped_items": len(v.skipped), "up_to_date": False}
    print(_summary_text(report, result))
    write_json_atomic(manifest_path, {"inputs": inputs, "result": result})
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def read_split(path: str | Path) -> list[dict]:
    """Read a split JSONL written by :func:`prepare` (one record per caption).

    Raises:
        DataError: if the file is missing or a line is not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Split file {path} does not exist; run the prepare stage first.")
    records = []
    with open(path, encoding="utf-8") as fh:
        for lineno, rec in json_lines(fh):
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno} is not a JSON object; re-run prepare with force.")
            records.append(rec)
    return records
