"""Dataset layouts: find a Flickr8k-style corpus and read its caption records.

Three input layouts are understood:

* ``original``: ``Flicker8k_Dataset/`` (or ``Images/``) + ``Flickr8k.token.txt`` (at the top or in
  ``Flickr8k_text/``) + the official ``Flickr_8k.{train,dev,test}Images.txt`` lists.
* ``kaggle``: ``Images/`` + ``captions.txt`` (CSV with an ``image,caption`` header).
* ``generic``: a ``.jsonl`` or ``.csv`` file of ``{"image": ..., "caption": ...}`` records; image
  paths are absolute or relative to the file's folder. The file itself is passed as ``data``.

Readers never raise for one bad record: they append it to ``skipped`` with its reason and go on.
``offline/data.py`` validates what they read and writes the splits; ``offline/sources.py`` turns the
same layouts into collection items.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from clipsearch.manifest import json_lines

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

# Skip reasons, as they appear in the reports.
R_MALFORMED = "malformed_record"
R_BAD_ID = "bad_image_id"
R_MISSING = "missing_image"
R_CORRUPT = "corrupt_image"
R_EMPTY = "empty_caption"
R_DUP = "duplicate_caption"
R_DUP_ID = "duplicate_caption_id"


class DataError(ValueError):
    """The dataset path or layout cannot be used at all (as opposed to one bad item)."""


@dataclass
class Layout:
    kind: str
    root: Path                      # folder that relative image paths resolve against
    caption_file: Path
    image_dir: Path | None          # None for generic
    split_lists: dict[str, Path] | None


@dataclass
class CaptionRecord:
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


def resolve_layout(data: Path) -> Layout:
    data = Path(data).expanduser()
    if not data.exists():
        raise DataError(f"Dataset path {data} does not exist.")
    data = data.resolve()
    if data.is_file():
        if data.suffix.lower() in GENERIC_SUFFIXES:
            return Layout("generic", data.parent, data, None, _find_split_lists(data.parent))
        raise DataError(f"{data} is a file but not a .jsonl or .csv caption file; "
                        "pass a Flickr8k folder or a .jsonl/.csv file of image,caption records.")
    image_dir = _find_image_dir(data)
    token = _find_text_file(data, TOKEN_FILE)
    kaggle = data / KAGGLE_FILE
    lists = _find_split_lists(data)
    # The original layout wins when both caption files are present: it carries caption ids.
    if image_dir is not None and token is not None:
        return Layout("original", data, token, image_dir, lists)
    if image_dir is not None and kaggle.is_file():
        return Layout("kaggle", data, kaggle, image_dir, lists)
    raise DataError(
        f"Unrecognised dataset layout in {data}: expected an image folder "
        f"({' or '.join(IMAGE_DIR_NAMES)}) with {TOKEN_FILE} (original) or {KAGGLE_FILE} "
        "(Kaggle), or pass a .jsonl/.csv file with image and caption columns.")


def detect_layout(data_dir: str | Path) -> str:
    """Return ``"original"``, ``"kaggle"`` or ``"generic"`` for a dataset path.

    Raises:
        DataError: if the path does not exist or matches no known layout.
    """
    return resolve_layout(Path(data_dir)).kind


def image_path_for(image_dir: Path, image_id: str) -> Path | None:
    # The stray Flickr8k id "....jpg.1" (and any id with a path separator) names no image file.
    if ("/" in image_id or "\\" in image_id or Path(image_id).suffix.lower() not in IMAGE_SUFFIXES):
        return None
    return image_dir / image_id


def read_original(layout: Layout, skipped: list[dict]) -> list[CaptionRecord]:
    assert layout.image_dir is not None
    out: list[CaptionRecord] = []
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
            out.append(CaptionRecord(image_id, image_path_for(layout.image_dir, image_id), key, text,
                                f"{name}:{lineno}"))
    return out


def read_kaggle(layout: Layout, skipped: list[dict]) -> list[CaptionRecord]:
    assert layout.image_dir is not None
    out: list[CaptionRecord] = []
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
            out.append(CaptionRecord(image_id, image_path_for(layout.image_dir, image_id), caption_id,
                                text, f"{name}:{lineno}"))
    return out


def generic_rows(path: Path, skipped: list[dict], required: tuple[str, ...] = ("image", "caption")
                 ) -> Iterator[tuple[int, dict]]:
    """(line number, record) of a .jsonl or .csv file; a CSV must have the `required` columns."""
    name = path.name
    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8-sig", errors="replace") as fh:
            for lineno, rec in json_lines(fh):
                if not isinstance(rec, dict):
                    skipped.append({"kind": "caption", "reason": R_MALFORMED,
                                    "where": f"{name}:{lineno}", "detail": "not a JSON object"})
                    continue
                yield lineno, rec
    else:
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip().lower() for f in (reader.fieldnames or [])]
            if any(col not in fields for col in required):
                raise DataError(f"{path} has no {' and '.join(repr(c) for c in required)} "
                                f"column{'s' if len(required) > 1 else ''} in its header row.")
            reader.fieldnames = fields
            for row in reader:
                yield reader.line_num, row


def read_generic(layout: Layout, skipped: list[dict]) -> list[CaptionRecord]:
    out: list[CaptionRecord] = []
    name = layout.caption_file.name
    counters: Counter[str] = Counter()
    for lineno, rec in generic_rows(layout.caption_file, skipped):
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
        out.append(CaptionRecord(image_id, path_or_none, cid.strip(), text, f"{name}:{lineno}"))
    return out


READERS = {"original": read_original, "kaggle": read_kaggle, "generic": read_generic}


def read_list(path: Path) -> list[str]:
    """One image id per line (the official split lists)."""
    with open(path, encoding="utf-8-sig") as fh:
        return [ln.strip() for ln in fh if ln.strip()]
