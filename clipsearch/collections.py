"""Incremental ingest, decided before anything is embedded: which items are new, changed or gone.

As rclip does, a file whose size and modification time match the catalog is unchanged without being
read; one whose stat differs is hashed, and only different bytes count as a changed image. Captions
and metadata are compared on their own, so new captions re-embed the captions alone and a moved or
touched file only updates its record.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from clipsearch.store.catalog import ItemState, captions_sha256


class PlannedItem(Protocol):
    image_id: str
    path: Path
    captions: tuple[str, ...]
    metadata: Mapping[str, Any]


@dataclass(frozen=True)
class FileStat:
    size: int
    mtime_ns: int
    sha256: str | None = None


@dataclass
class IngestPlan:
    new: list[tuple[Any, FileStat]] = field(default_factory=list)  # embed image + captions
    changed: list[tuple[Any, FileStat]] = field(default_factory=list)  # different bytes: embed again
    recaptioned: list[tuple[Any, FileStat]] = field(default_factory=list)  # same image, new captions
    restated: list[tuple[Any, FileStat]] = field(default_factory=list)  # same vectors; path/stat/metadata
    unchanged: int = 0
    removed: list[str] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (image_id, why) unreadable now

    @property
    def to_embed(self) -> list[tuple[Any, FileStat]]:
        return self.new + self.changed

    def counts(self) -> dict[str, int]:
        return {"new": len(self.new), "changed": len(self.changed), "recaptioned": len(self.recaptioned),
                "restated": len(self.restated), "unchanged": self.unchanged, "removed": len(self.removed)}

    def summary(self) -> str:
        c = self.counts()
        return (f"{c['new']} new, {c['changed']} changed, {c['recaptioned']} with new captions, "
                f"{c['removed']} removed, {c['unchanged'] + c['restated']} unchanged")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def plan_ingest(items: Sequence[PlannedItem], states: Mapping[str, ItemState],
                hasher: Callable[[Path], str] = file_sha256) -> IngestPlan:
    plan = IngestPlan()
    seen = set()
    for item in items:
        seen.add(item.image_id)
        try:
            st = os.stat(item.path)
        except OSError as exc:
            plan.missing.append((item.image_id, exc.strerror or "cannot stat"))
            continue
        old = states.get(item.image_id)
        stat = FileStat(st.st_size, st.st_mtime_ns)
        if old is None:
            plan.new.append((item, FileStat(st.st_size, st.st_mtime_ns, _hash(hasher, item.path))))
            continue
        same_stat = old.size == stat.size and old.mtime_ns == stat.mtime_ns
        if same_stat:
            stat = FileStat(stat.size, stat.mtime_ns, old.sha256)
        else:
            stat = FileStat(stat.size, stat.mtime_ns, _hash(hasher, item.path))
            if stat.sha256 != old.sha256:
                plan.changed.append((item, stat))
                continue
        if captions_sha256(item.captions) != old.text_sha256:
            plan.recaptioned.append((item, stat))
        elif not same_stat or old.path != str(item.path) or dict(old.metadata) != dict(item.metadata):
            plan.restated.append((item, stat))
        else:
            plan.unchanged += 1
    plan.removed = sorted(set(states) - seen)
    return plan


def _hash(hasher: Callable[[Path], str], path: Path) -> str | None:
    try:
        return hasher(path)
    except OSError:
        return None
