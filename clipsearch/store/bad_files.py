"""Source files that failed to decode, kept in the catalog's `bad_files` table until they change.

A re-ingest (or the folder watcher) compares a file with its record here: the same size and mtime,
or the same bytes, and the file is "bad (unchanged)": not decoded, not counted as new, again. The
table is written without bumping the catalog's `seq` (the derived indexes never see it).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

from clipsearch.manifest import ArtifactError


@dataclass(frozen=True)
class BadFile:
    """A source file that failed to decode, as it was when it last failed."""

    image_id: str
    path: str
    size: int | None
    mtime_ns: int | None
    sha256: str | None
    reason: str
    tries: int
    last_tried: str


def read_bad_files(catalog) -> dict[str, BadFile]:
    with catalog._lock:
        try:
            rows = catalog._conn.execute("SELECT image_id, path, size, mtime_ns, sha256, reason, tries, last_tried "
                                         "FROM bad_files").fetchall()
        except sqlite3.OperationalError:  # a read-only open of a file older than the table
            return {}
    return {r[0]: BadFile(*r) for r in rows}


def write_bad_files(catalog, bad: Iterable[BadFile], clear: Iterable[str] = ()) -> None:
    """Record (replace) failed files and forget the ones in `clear`, in one transaction."""
    if catalog.readonly:
        raise ArtifactError("this catalog is open read-only")
    rows = [(b.image_id, b.path, b.size, b.mtime_ns, b.sha256, b.reason, int(b.tries), b.last_tried) for b in bad]
    gone = [(i,) for i in clear]
    if not rows and not gone:
        return
    with catalog._lock:
        conn = catalog._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("DELETE FROM bad_files WHERE image_id = ?", gone)
            conn.executemany("INSERT OR REPLACE INTO bad_files VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
