"""What `ingest` reads: a folder of photos, a .jsonl/.csv of records, or a Flickr8k layout, as items.

* **folder**: every image below it (recursive, hidden files and folders skipped); a sidecar
  `name.txt` beside `name.jpg` holds its captions, one a line. Metadata: `folder` (relative, "." at
  the top), `file_time` (the file's modification time, UTC, ISO 8601).
* **records** (`.jsonl` / `.csv`): `image` (a path, relative to the file's folder or absolute), an
  optional `caption` (a string, or a list in JSONL) or `captions` list, optional `caption_id`; every
  other field is kept as metadata. Several records of one image add up its captions.
* **flickr8k** (original or Kaggle layout): every image of the image folder, with its captions when
  it has any, and its official split (`split`: train / val / test) as metadata.

Bad records are listed in `skipped` with their reason, never fatal; an unreadable source is one
`DataError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from offline.layouts import (GENERIC_SUFFIXES, IMAGE_SUFFIXES, R_MALFORMED, R_MISSING, READERS, SPLITS, DataError,
                             generic_rows, read_list, resolve_layout)

R_EMPTY_SOURCE = "no_images"
_CAPTION_FIELDS = ("image", "caption", "captions", "caption_id")


@dataclass(frozen=True)
class SourceItem:
    image_id: str
    path: Path
    captions: tuple[str, ...] = ()
    caption_ids: tuple[str, ...] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Source:
    kind: str  # folder | records | flickr8k
    root: Path
    items: list[SourceItem]
    skipped: list[dict[str, Any]]


def _clean(text: str) -> str:
    return " ".join(text.split())


def _file_time(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).replace(microsecond=0).isoformat()


def read_source(source: str | Path) -> Source:
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{path} does not exist: pass a folder of images, a .jsonl/.csv of records, "
                        "or a Flickr8k folder")
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() not in GENERIC_SUFFIXES:
            raise DataError(f"{path} is a file but not a .jsonl or .csv of records; pass a folder of "
                            "images or such a file")
        return _read_records(path)
    try:
        layout = resolve_layout(path)
    except DataError:
        return _read_folder(path)
    return _read_flickr8k(layout)


def _walk_images(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(dirpath) / name


def _read_folder(root: Path) -> Source:
    items, skipped = [], []
    for path in _walk_images(root):
        rel = path.relative_to(root)
        captions: tuple[str, ...] = ()
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file():
            try:
                text = sidecar.read_text(encoding="utf-8-sig", errors="replace")
                captions = tuple(c for c in (_clean(line) for line in text.splitlines()) if c)
            except OSError as exc:
                skipped.append({"kind": "caption", "reason": R_MALFORMED, "where": str(rel.with_suffix(".txt")),
                                "detail": f"sidecar unreadable ({exc.strerror})"})
        try:
            file_time = _file_time(path)
        except OSError:
            skipped.append({"kind": "image", "reason": R_MISSING, "image_id": rel.as_posix(),
                            "detail": "image file vanished while listing"})
            continue
        items.append(SourceItem(rel.as_posix(), path, captions, None,
                                {"folder": rel.parent.as_posix(), "file_time": file_time}))
    return Source("folder", root, items, skipped)


def _caption_list(value: Any) -> list[str] | None:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def _read_records(file: Path) -> Source:
    root = file.parent
    skipped: list[dict[str, Any]] = []
    by_id: dict[str, SourceItem] = {}
    order: list[str] = []
    for lineno, rec in generic_rows(file, skipped, required=("image",)):
        where = f"{file.name}:{lineno}"
        image = rec.get("image")
        caps = _caption_list(rec.get("captions") if rec.get("captions") is not None else rec.get("caption"))
        if not isinstance(image, str) or not image.strip() or caps is None:
            skipped.append({"kind": "record", "reason": R_MALFORMED, "where": where,
                            "detail": "needs a string 'image' and, if any, a string or list 'caption'"})
            continue
        rel = Path(image.strip()).expanduser()
        path = Path(os.path.normpath(rel if rel.is_absolute() else root / rel))
        try:
            image_id = path.relative_to(root).as_posix()
        except ValueError:
            image_id = path.as_posix()
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append({"kind": "record", "reason": R_MALFORMED, "where": where, "image_id": image_id,
                            "detail": f"'{path.suffix or path.name}' is not an image file suffix"})
            continue
        captions = [c for c in (_clean(c) for c in caps) if c]
        metadata = {k: v for k, v in rec.items() if k not in _CAPTION_FIELDS and v not in (None, "")}
        try:
            json.dumps(metadata)
        except (TypeError, ValueError):
            metadata = {k: str(v) for k, v in metadata.items()}
        cid = rec.get("caption_id")
        prev = by_id.get(image_id)
        if prev is None:
            order.append(image_id)
            ids = tuple(f"{image_id}#{i}" for i in range(len(captions)))
            if isinstance(cid, str) and cid.strip() and len(captions) == 1:
                ids = (cid.strip(),)
            by_id[image_id] = SourceItem(image_id, path, tuple(captions), ids, metadata)
        else:
            start = len(prev.captions)
            ids = tuple(f"{image_id}#{start + i}" for i in range(len(captions)))
            if isinstance(cid, str) and cid.strip() and len(captions) == 1:
                ids = (cid.strip(),)
            by_id[image_id] = SourceItem(image_id, path, prev.captions + tuple(captions),
                                         (prev.caption_ids or ()) + ids, {**metadata, **prev.metadata})
    return Source("records", root, [by_id[i] for i in order], skipped)


def _read_flickr8k(layout) -> Source:
    skipped: list[dict[str, Any]] = []
    raw = READERS[layout.kind](layout, skipped)
    split_of: dict[str, str] = {}
    for s in SPLITS:
        for image_id in read_list(layout.split_lists[s]) if layout.split_lists else ():
            split_of.setdefault(image_id, s)
    captions: dict[str, list[tuple[str, str]]] = {}
    for c in raw:
        text = _clean(c.caption)
        if c.image_path is None:
            skipped.append({"kind": "caption", "reason": "bad_image_id", "where": c.where,
                            "caption_id": c.caption_id, "detail": "caption id does not name an image file"})
        elif text:
            captions.setdefault(c.image_id, []).append((c.caption_id, text))
        else:
            skipped.append({"kind": "caption", "reason": "empty_caption", "where": c.where,
                            "caption_id": c.caption_id, "detail": "caption is empty"})
    items = []
    on_disk = set()
    for path in _walk_images(layout.image_dir):
        image_id = path.relative_to(layout.image_dir).as_posix()
        on_disk.add(image_id)
        seen: set[str] = set()
        caps = []
        for cid, text in captions.get(image_id, []):
            if cid not in seen:
                seen.add(cid)
                caps.append((cid, text))
        meta: dict[str, Any] = {"split": split_of[image_id]} if image_id in split_of else {}
        items.append(SourceItem(image_id, path, tuple(t for _, t in caps), tuple(c for c, _ in caps), meta))
    for image_id in sorted(set(captions) - on_disk):
        skipped.append({"kind": "image", "reason": R_MISSING, "image_id": image_id,
                        "captions_dropped": len(captions[image_id]), "detail": "image file not found"})
    return Source("flickr8k", layout.root, items, skipped)
