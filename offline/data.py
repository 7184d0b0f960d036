"""The ``prepare`` stage: read a Flickr8k-style corpus, validate it, write image-disjoint splits.

Three input layouts are understood:

* ``original``: ``Flicker8k_Dataset/`` (or ``Images/``) + ``Flickr8k.token.txt`` (at the top or in
  ``Flickr8k_text/``) + the official ``Flickr_8k.{train,dev,test}Images.txt`` lists.
* ``kaggle``: ``Images/`` + ``captions.txt`` (CSV with an ``image,caption`` header).
* ``generic``: a ``.jsonl`` or ``.csv`` file of ``{"image": ..., "caption": ...}`` records; image
  paths are absolute or relative to the file's folder. The file itself is passed as ``data``.

Output (``<out>/splits/``): ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` with one record per
caption (``image_id``, ``image_path``, ``caption_id``, ``caption``), plus
``prepare_manifest.json`` for idempotence; ``<out>/validation_report.json`` lists every skipped
item with its reason. Bad items are skipped, never fatal.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from tqdm import tqdm

from clipsearch.images import MAX_IMAGE_PIXELS, ImageDecodeError, decode_image_with_mode

try:  # shared helpers; the fallbacks keep this module usable on its own
    from clipsearch.manifest import atomic_write_text, write_json_atomic
except ImportError:  # pragma: no cover - only when clipsearch.manifest is absent
    atomic_write_text = None  # type: ignore[assignment]
    write_json_atomic = None  # type: ignore[assignment]

__all__ = ["DataError", "SPLITS", "detect_layout", "prepare", "read_split"]

#: Bump when the output format or validation rules change, so old outputs are not reused.
PREPARE_FORMAT = 2  # 2: repeated captions of an image are kept (noted), as published Flickr8k results count them
SPLITS = ("train", "val", "test")

IMAGE_DIR_NAMES = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images")
TEXT_DIR_NAMES = ("", "Flickr8k_text")
TOKEN_FILE = "Flickr8k.token.txt"
KAGGLE_FILE = "captions.txt"
# The official lists call the validation split "dev".
SPLIT_LIST_FILES = {"train": "Flickr_8k.trainImages.txt",
                    "val": "Flickr_8k.devImages.txt",
                    "test": "Flickr_8k.testImages.txt"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
GENERIC_SUFFIXES = {".jsonl", ".csv"}

# Skip reasons, as they appear in the report.
R_MALFORMED = "malformed_record"
R_BAD_ID = "bad_image_id"
R_MISSING = "missing_image"
R_CORRUPT = "corrupt_image"
R_EMPTY = "empty_caption"
R_DUP = "duplicate_caption"
R_DUP_ID = "duplicate_caption_id"


class DataError(ValueError):
    """The dataset path or layout cannot be used at all (as opposed to one bad item)."""


# --------------------------------------------------------------------------------------------
# Atomic writes


def _write_text(path: Path, text: str) -> None:
    if atomic_write_text is not None:
        atomic_write_text(path, text)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_json(path: Path, obj: Any) -> None:
    if write_json_atomic is not None:
        write_json_atomic(path, obj)
    else:
        _write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------
# Layout detection and readers


@dataclass
class _Layout:
    kind: str
    root: Path                      # folder that relative image paths resolve against
    caption_file: Path
    image_dir: Path | None          # None for generic
    split_lists: dict[str, Path] | None


@dataclass
class _Caption:
    image_id: str
    image_path: Path | None         # None when the id cannot name an image file
    caption_id: str
    caption: str                    # raw text
    where: str                      # "file:line" for the report


def _find_image_dir(root: Path) -> Path | None:
    for name in IMAGE_DIR_NAMES:
        if (root / name).is_dir():
            return root / name
    return None


def _find_text_file(root: Path, name: str) -> Path | None:
    for sub in TEXT_DIR_NAMES:
        p = root / sub / name if sub else root / name
        if p.is_file():
            return p
    return None


def _find_split_lists(root: Path) -> dict[str, Path] | None:
    found = {s: _find_text_file(root, f) for s, f in SPLIT_LIST_FILES.items()}
    if all(found.values()):
        return found  # type: ignore[return-value]
    return None


def _resolve_layout(data: Path) -> _Layout:
    data = Path(data).expanduser()
    if not data.exists():
        raise DataError(f"Dataset path {data} does not exist.")
    data = data.resolve()
    if data.is_file():
        if data.suffix.lower() in GENERIC_SUFFIXES:
            return _Layout("generic", data.parent, data, None, _find_split_lists(data.parent))
        raise DataError(f"{data} is a file but not a .jsonl or .csv caption file; "
                        "pass a Flickr8k folder or a .jsonl/.csv file of image,caption records.")
    image_dir = _find_image_dir(data)
    token = _find_text_file(data, TOKEN_FILE)
    kaggle = data / KAGGLE_FILE
    lists = _find_split_lists(data)
    # The original layout wins when both caption files are present: it carries caption ids.
    if image_dir is not None and token is not None:
        return _Layout("original", data, token, image_dir, lists)
    if image_dir is not None and kaggle.is_file():
        return _Layout("kaggle", data, kaggle, image_dir, lists)
    raise DataError(
        f"Unrecognised dataset layout in {data}: expected an image folder "
        f"({' or '.join(IMAGE_DIR_NAMES)}) with {TOKEN_FILE} (original) or {KAGGLE_FILE} "
        "(Kaggle), or pass a .jsonl/.csv file with image and caption columns.")


def detect_layout(data_dir: str | Path) -> str:
    """Return ``"original"``, ``"kaggle"`` or ``"generic"`` for a dataset path.

    Raises:
        DataError: if the path does not exist or matches no known layout.
    """
    return _resolve_layout(Path(data_dir)).kind


def _image_path_for(image_dir: Path, image_id: str) -> Path | None:
    # The stray Flickr8k id "....jpg.1" (and any id with a path separator) names no image file.
    if ("/" in image_id or "\\" in image_id or Path(image_id).suffix.lower() not in IMAGE_SUFFIXES):
        return None
    return image_dir / image_id


def _read_original(layout: _Layout, skipped: list[dict]) -> list[_Caption]:
    assert layout.image_dir is not None
    out: list[_Caption] = []
    name = layout.caption_file.name
    with open(layout.caption_file, encoding="utf-8-sig", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            key, sep, text = line.partition("\t")
            if not sep or "#" not in key:
                skipped.append({"kind": "caption", "reason": R_MALFORMED,
                                "where": f"{name}:{lineno}",
                                "detail": "expected '<image>#<k><TAB><caption>'"})
                continue
            key = key.strip()
            image_id = key.rsplit("#", 1)[0]
            out.append(_Caption(image_id, _image_path_for(layout.image_dir, image_id), key, text,
                                f"{name}:{lineno}"))
    return out


def _read_kaggle(layout: _Layout, skipped: list[dict]) -> list[_Caption]:
    assert layout.image_dir is not None
    out: list[_Caption] = []
    name = layout.caption_file.name
    counters: Counter[str] = Counter()
    with open(layout.caption_file, encoding="utf-8-sig", errors="replace", newline="") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip().lower() for f in (reader.fieldnames or [])]
        if "image" not in fields or "caption" not in fields:
            raise DataError(f"{layout.caption_file} has no 'image,caption' header row.")
        reader.fieldnames = fields
        for row in reader:
            lineno = reader.line_num
            image_id = (row.get("image") or "").strip()
            text = row.get("caption")
            if not image_id or text is None or None in row:
                skipped.append({"kind": "caption", "reason": R_MALFORMED,
                                "where": f"{name}:{lineno}",
                                "detail": "expected 'image,caption' (quote captions with commas)"})
                continue
            # Number captions per image in file order, which reproduces the original '#k' ids.
            caption_id = f"{image_id}#{counters[image_id]}"
            counters[image_id] += 1
            out.append(_Caption(image_id, _image_path_for(layout.image_dir, image_id), caption_id,
                                text, f"{name}:{lineno}"))
    return out


def _generic_rows(path: Path, skipped: list[dict]) -> Iterator[tuple[int, dict]]:
    name = path.name
    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8-sig", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    rec = None
                if not isinstance(rec, dict):
                    skipped.append({"kind": "caption", "reason": R_MALFORMED,
                                    "where": f"{name}:{lineno}", "detail": "not a JSON object"})
                    continue
                yield lineno, rec
    else:
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip().lower() for f in (reader.fieldnames or [])]
            if "image" not in fields or "caption" not in fields:
                raise DataError(f"{path} has no 'image' and 'caption' columns in its header row.")
            reader.fieldnames = fields
            for row in reader:
                yield reader.line_num, row


def _read_generic(layout: _Layout, skipped: list[dict]) -> list[_Caption]:
    out: list[_Caption] = []
    name = layout.caption_file.name
    counters: Counter[str] = Counter()
    for lineno, rec in _generic_rows(layout.caption_file, skipped):
        image = rec.get("image")
        text = rec.get("caption")
        if not isinstance(image, str) or not image.strip() or not isinstance(text, str):
            skipped.append({"kind": "caption", "reason": R_MALFORMED, "where": f"{name}:{lineno}",
                            "detail": "needs string 'image' and 'caption' fields"})
            continue
        rel = Path(image.strip()).expanduser()
        path = rel if rel.is_absolute() else layout.root / rel
        path = Path(os.path.normpath(path))
        # Ids must be unique across subfolders, so keep the path relative to the file's folder.
        try:
            image_id = path.relative_to(layout.root).as_posix()
        except ValueError:
            image_id = path.as_posix()
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            path_or_none: Path | None = None
        else:
            path_or_none = path
        cid = rec.get("caption_id")
        if not isinstance(cid, str) or not cid.strip():
            cid = f"{image_id}#{counters[image_id]}"
        counters[image_id] += 1
        out.append(_Caption(image_id, path_or_none, cid.strip(), text, f"{name}:{lineno}"))
    return out


_READERS = {"original": _read_original, "kaggle": _read_kaggle, "generic": _read_generic}


# --------------------------------------------------------------------------------------------
# Fingerprint for idempotence


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _inputs_fingerprint(layout: _Layout) -> str:
    """Hash of the caption file, split lists and the image listing (names + sizes, not contents)."""
    h = hashlib.sha256()
    h.update(f"captions {_sha256_file(layout.caption_file)}\n".encode())
    for s, p in sorted((layout.split_lists or {}).items()):
        h.update(f"list {s} {_sha256_file(p)}\n".encode())
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
        paths = sorted({str(c.image_path) for c in _read_generic(layout, skipped) if c.image_path})
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
    captions: dict[str, list[_Caption]]          # image_id -> kept captions, in file order
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


def _validate(layout: _Layout, workers: int) -> _Validated:
    skipped: list[dict] = []
    raw = _READERS[layout.kind](layout, skipped)
    n_malformed = len(skipped)

    by_image: dict[str, list[_Caption]] = {}
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

    kept: dict[str, list[_Caption]] = {}
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
            kept.setdefault(image_id, []).append(_Caption(image_id, c.image_path, c.caption_id,
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


def _read_list(path: Path) -> list[str]:
    with open(path, encoding="utf-8-sig") as fh:
        return [ln.strip() for ln in fh if ln.strip()]


def _official_split(layout: _Layout, usable: Iterable[str]) -> tuple[dict[str, list[str]], dict]:
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
        for image_id in _read_list(layout.split_lists[s]):
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
    layout = _resolve_layout(Path(data))
    if split == "official" and layout.split_lists is None:
        _official_split(layout, ())  # raises the explanatory DataError before any work
    out = Path(out).expanduser().resolve()
    split_dir = out / "splits"
    report_path = out / "validation_report.json"
    manifest_path = split_dir / "prepare_manifest.json"
    split_paths = {s: split_dir / f"{s}.jsonl" for s in SPLITS}

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
        _write_text(split_paths[s], _jsonl(recs))
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
    _write_json(report_path, report)
    result = {"layout": layout.kind, "split": split, "counts": counts,
              "splits": {s: str(p) for s, p in split_paths.items()}, "report": str(report_path),
              "skipped_items": len(v.skipped), "up_to_date": False}
    print(_summary_text(report, result))
    _write_json(manifest_path, {"inputs": inputs, "result": result})
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
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno} is not a JSON object; re-run prepare with force.")
            records.append(rec)
    return records
