"""Incremental ingest, decided before anything is embedded: which items are new, changed or gone.

As rclip does, a file whose size and modification time match the catalog is unchanged without being
read; one whose stat differs is hashed, and only different bytes count as a changed image. Captions
and metadata are compared on their own, so new captions re-embed the captions alone and a moved or
touched file only updates its record.

Known bytes are never embedded again: a new file whose sha256 is that of an item gone from the
source is a move or rename (the item is re-linked under its new id and path, its vectors kept; a
renamed folder of 10,000 photos embeds nothing), and one whose sha256 is that of an item still
there is a copy (its vectors copied). A file that failed to decode is recorded with its stat and
hash (`clipsearch.store.bad_files`); until it changes it is "bad (unchanged)", neither decoded nor
counted as new, once it has been tried `max_tries` times.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from clipsearch.manifest import now_iso
from clipsearch.store.bad_files import BadFile, read_bad_files, write_bad_files
from clipsearch.store.catalog import Catalog, ItemState, Relink, captions_sha256


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
    moved: list[tuple[Any, FileStat, str]] = field(default_factory=list)  # (item, stat, old id): vectors kept
    copied: list[tuple[Any, FileStat, str]] = field(default_factory=list)  # (item, stat, source id)
    copied_new: list[tuple[Any, FileStat, str]] = field(default_factory=list)  # copies of a file new here
    bad_unchanged: list[tuple[Any, FileStat, BadFile]] = field(default_factory=list)  # parked until changed
    retried: int = 0  # files that failed before, tried again (changed, or fewer than max_tries tries)
    bad_before: dict[str, BadFile] = field(default_factory=dict)

    @property
    def to_embed(self) -> list[tuple[Any, FileStat]]:
        return self.new + self.changed

    def counts(self) -> dict[str, int]:
        return {"new": len(self.new), "changed": len(self.changed), "recaptioned": len(self.recaptioned),
                "restated": len(self.restated), "unchanged": self.unchanged, "removed": len(self.removed),
                "moved": len(self.moved), "copied": len(self.copied) + len(self.copied_new),
                "bad_unchanged": len(self.bad_unchanged),
                "retried": self.retried}

    def summary(self) -> str:
        c = self.counts()
        extra = "".join(f", {c[k]} {label}" for k, label in (("moved", "moved or renamed"),
                                                             ("copied", "copies of known files"),
                                                             ("bad_unchanged", "bad (unchanged)"),
                                                             ("retried", "bad before, tried again")) if c[k])
        return (f"{c['new']} new, {c['changed']} changed, {c['recaptioned']} with new captions, "
                f"{c['removed']} removed, {c['unchanged'] + c['restated']} unchanged{extra}")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def plan_ingest(items: Sequence[PlannedItem], states: Mapping[str, ItemState],
                hasher: Callable[[Path], str] = file_sha256, bad: Mapping[str, BadFile] | None = None,
                max_tries: int = 1) -> IngestPlan:
    """`bad`: the files that failed before (`read_bad_files`); one unchanged since is parked once it
    has been tried `max_tries` times (plain ingest: 1; the watcher retries a few times, as a file
    may have been read while still being written)."""
    plan = IngestPlan(bad_before=dict(bad or {}))
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
        failed = plan.bad_before.get(item.image_id)
        if failed is not None:
            if (failed.size, failed.mtime_ns) != (stat.size, stat.mtime_ns):
                stat = FileStat(stat.size, stat.mtime_ns, _hash(hasher, item.path))
            same = (failed.size, failed.mtime_ns) == (stat.size, stat.mtime_ns) or stat.sha256 == failed.sha256
            if same and failed.tries >= max_tries:
                plan.bad_unchanged.append((item, FileStat(stat.size, stat.mtime_ns, failed.sha256), failed))
                continue
            plan.retried += 1
            if stat.sha256 is None:
                stat = FileStat(stat.size, stat.mtime_ns, failed.sha256 if same else _hash(hasher, item.path))
            if old is None:
                plan.new.append((item, stat))
            else:
                plan.changed.append((item, stat))
            continue
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
    _find_known(plan, states)
    return plan


def _find_known(plan: IngestPlan, states: Mapping[str, ItemState]) -> None:
    """New files with known bytes: moves (the bytes of an item gone from the source; one each) and
    copies (of an item still there). Neither is embedded."""
    gone: dict[str, list[str]] = {}
    for image_id in plan.removed:
        sha = states[image_id].sha256
        if sha:
            gone.setdefault(sha, []).append(image_id)
    removed = set(plan.removed)
    # sha256 -> (an item with those bytes, its captions' hash)
    present = {st.sha256: (st.image_id, st.text_sha256) for st in states.values()
               if st.sha256 and st.image_id not in removed}
    new, first_new = [], {}
    for item, stat in plan.new:
        if stat.sha256 and gone.get(stat.sha256):
            old = gone[stat.sha256].pop(0)
            plan.moved.append((item, stat, old))
            # a copy of it may come from its new place
            present.setdefault(stat.sha256, (item.image_id, states[old].text_sha256))
        elif stat.sha256 and stat.sha256 in present:
            plan.copied.append((item, stat, present[stat.sha256][0]))
        elif stat.sha256 and stat.sha256 in first_new:  # embedded once, in this pass, then copied
            plan.copied_new.append((item, stat, first_new[stat.sha256]))
        else:
            new.append((item, stat))
            if stat.sha256:
                first_new[stat.sha256] = item.image_id
    plan.new = new
    moved_from = {old for _, _, old in plan.moved}
    plan.removed = [i for i in plan.removed if i not in moved_from]
    texts = {image_id: text for image_id, text in present.values()} | {old: states[old].text_sha256 for old in moved_from}
    texts |= {item.image_id: captions_sha256(item.captions) for item, _ in new}
    for item, stat, old in plan.moved + plan.copied + plan.copied_new:  # a sidecar changed on the way
        if captions_sha256(item.captions) != texts[old]:
            plan.recaptioned.append((item, stat))


def relink_known(catalog: Catalog, plan: IngestPlan, after_embedding: bool = False) -> int:
    """Write the plan's moves and copies (no embedding; one transaction); returns how many. Moves
    first: a copy's source may be a file that moved in the same commit. `after_embedding`: the
    copies of files embedded in this run (a copy whose original failed to decode is left out)."""
    if after_embedding:
        links = [Relink(src, _state(item, stat), item.caption_ids, keep_source=True)
                 for item, stat, src in plan.copied_new]
        return catalog.relink(links) if links else 0
    links = [Relink(old, _state(item, stat), item.caption_ids) for item, stat, old in plan.moved]
    links += [Relink(old, _state(item, stat), item.caption_ids, keep_source=True) for item, stat, old in plan.copied]
    return catalog.relink(links) if links else 0


def _state(item: PlannedItem, stat: FileStat) -> ItemState:
    return ItemState(item.image_id, str(item.path), stat.size, stat.mtime_ns, stat.sha256, "", item.metadata)


def settle_bad_files(catalog: Catalog, plan: IngestPlan, failed: Mapping[str, str],
                     present: set[str] | None = None) -> dict[str, BadFile]:
    """After the embedding: record the files of `plan.to_embed` that failed (`failed`: id → reason),
    one more try each where their bytes are the ones that failed before, and forget the ones that
    were written or are no longer in the source (`present`: the ids the source still has; None: keep)."""
    now = now_iso()
    bad = []
    for item, stat in plan.to_embed:
        reason = failed.get(item.image_id)
        if reason is None:
            continue
        before = plan.bad_before.get(item.image_id)
        tries = before.tries + 1 if before is not None and before.sha256 == stat.sha256 else 1
        bad.append(BadFile(item.image_id, str(item.path), stat.size, stat.mtime_ns, stat.sha256, reason, tries, now))
    written = {item.image_id for item, _ in plan.to_embed if item.image_id not in failed}
    written |= {item.image_id for item, _, _ in plan.moved + plan.copied + plan.copied_new}
    gone = set(plan.bad_before) - present if present is not None else set()
    write_bad_files(catalog, bad, clear=sorted((written | gone) & set(plan.bad_before)))
    return read_bad_files(catalog)


def _hash(hasher: Callable[[Path], str], path: Path) -> str | None:
    try:
        return hasher(path)
    except OSError:
        return None
