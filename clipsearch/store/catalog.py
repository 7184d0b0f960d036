"""A collection's source of truth: one SQLite database (WAL) of items, captions, metadata and vectors.

Every change runs in one transaction and bumps a sequence number, so "committed" is "acknowledged":
a process killed at any moment leaves the database at its last commit. The FAISS index is derived
from these rows (`clipsearch.store.faiss_store`) and can be rebuilt from them at any time.

Tables:
  meta(key, value)       format, model (JSON identity), dim, seq, hubness and hubness_images (JSON or
                         null: how the caption and the image offsets were made), rebuild_seq, created
  items(row, image_id, path, size, mtime_ns, sha256, metadata JSON, text_sha256, vector, offset, seq)
  captions(row, caption_id, image_id, ord, caption, vector, offset, seq)
  tombstones(image_id, seq)  the deletions log: which item a commit removed (the rows themselves go)
  bad_files(image_id, path, size, mtime_ns, sha256, reason, tries, last_tried)  source files that
                         failed to decode, kept until they change so a re-ingest does not retry them
                         forever (written without bumping `seq`: readers of the index ignore them)
`row` (INTEGER PRIMARY KEY) orders the vectors of the derived index. Vectors are float32 bytes.
`seq` on a row is the commit that last wrote it, so the changes after a snapshot of the derived index
are the rows with a larger seq plus the tombstones with a larger seq (`changes_since`). A commit that
changes rows without touching their seq (the caption or image offsets of the hubness correction)
records `rebuild_seq` in meta: a derived index older than that must be rebuilt, not patched.

`offset` is a row's hubness offset (−β·r, see `offline/hubness.py`): searches of that target rank by
`cosine + offset`. `items.offset` came later than the rest: a writable open adds the column to an
older file (every image offset 0), a read-only open of one reads the offsets as 0.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from clipsearch.manifest import ArtifactError, now_iso, sha256_json

CATALOG_FORMAT = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS items (
    row INTEGER PRIMARY KEY AUTOINCREMENT,
    image_id TEXT NOT NULL UNIQUE,
    path TEXT NOT NULL,
    size INTEGER,
    mtime_ns INTEGER,
    sha256 TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    text_sha256 TEXT NOT NULL,
    vector BLOB NOT NULL,
    offset REAL NOT NULL DEFAULT 0,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS captions (
    row INTEGER PRIMARY KEY AUTOINCREMENT,
    caption_id TEXT NOT NULL UNIQUE,
    image_id TEXT NOT NULL REFERENCES items(image_id) ON DELETE CASCADE,
    ord INTEGER NOT NULL,
    caption TEXT NOT NULL,
    vector BLOB NOT NULL,
    offset REAL NOT NULL DEFAULT 0,
    seq INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS captions_by_image ON captions(image_id);
CREATE TABLE IF NOT EXISTS tombstones (image_id TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS tombstones_by_seq ON tombstones(seq);
CREATE INDEX IF NOT EXISTS items_by_seq ON items(seq);
CREATE TABLE IF NOT EXISTS bad_files (image_id TEXT PRIMARY KEY, path TEXT NOT NULL, size INTEGER,
    mtime_ns INTEGER, sha256 TEXT, reason TEXT NOT NULL, tries INTEGER NOT NULL, last_tried TEXT NOT NULL);
"""


def captions_sha256(captions: Sequence[str]) -> str:
    """What an item's caption list hashes to (a changed list means re-embedding its captions)."""
    return sha256_json(list(captions))


@dataclass(frozen=True)
class ItemState:
    """What incremental ingest compares against a source file."""

    image_id: str
    path: str
    size: int | None
    mtime_ns: int | None
    sha256: str | None
    text_sha256: str
    metadata: Mapping[str, Any]


@dataclass(frozen=True)
class NewItem:
    """One item to write: the image's vector, its captions with theirs, and its metadata."""

    image_id: str
    path: str
    vector: NDArray[np.float32]
    captions: tuple[str, ...] = ()
    caption_vectors: NDArray[np.float32] | None = None  # (len(captions), dim)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    size: int | None = None
    mtime_ns: int | None = None
    sha256: str | None = None
    caption_ids: tuple[str, ...] | None = None  # default: "<image_id>#<i>"
    offset: float = 0.0  # the image's hubness offset (text → image searches rank by cosine + offset)
    caption_offsets: NDArray[np.float32] | None = None  # one hubness offset per caption; default zeros


@dataclass(frozen=True)
class Relink:
    """An item made from another one's vectors without embedding: a file moved or renamed (the source
    item goes, its id is mapped to the new one) or a copy of known bytes (`keep_source`)."""

    source_id: str
    state: ItemState  # the new item's id, path, stat and metadata (text_sha256 unused)
    caption_ids: tuple[str, ...] | None = None  # default: "<image_id>#<i>"
    keep_source: bool = False


@dataclass
class CatalogRows:
    """Every live row, in row order, as the derived index needs them."""

    image_ids: list[str]
    paths: list[str]
    metadata: list[dict[str, Any]]
    vectors: NDArray[np.float32]
    caption_ids: list[str]
    caption_image_rows: NDArray[np.int64]  # row of each caption's image in `image_ids`
    caption_texts: list[str]
    caption_vectors: NDArray[np.float32]
    caption_offsets: NDArray[np.float32]
    seq: int
    image_offsets: NDArray[np.float32] = field(default_factory=lambda: np.zeros(0, np.float32))  # row order
    item_seqs: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))  # commit of each item
    caption_seqs: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass
class CatalogChanges:
    """What committed after a sequence number, read in one transaction."""

    seq: int  # the catalog's sequence number at the read
    uid: str | None
    rebuild_seq: int  # the last commit that changed rows without bumping their seq (see module doc)
    deleted: list[str]  # items removed after `since` (some may have been added again: see `rows`)
    rows: CatalogRows  # items written after `since`, with all their captions


class Catalog:
    """Thread-safe access to one catalog file (or `":memory:"`). Writers are serialised by a lock;
    SQLite's WAL lets readers of other processes see the last commit."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = str(path)
        self.readonly = readonly
        self._lock = threading.RLock()
        try:
            if self.path == ":memory:":
                conn = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
            elif readonly:
                p = Path(self.path)
                if not p.is_file():
                    raise ArtifactError(f"missing catalog {p}")
                conn = _connect_readonly(p)
            else:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA foreign_keys=ON")
            if not readonly:
                conn.execute("PRAGMA journal_mode=WAL")
                # FULL: a commit is on disk when it returns, so an acknowledged write survives a crash.
                conn.execute("PRAGMA synchronous=FULL")
                conn.executescript(_SCHEMA)
                _add_missing_columns(conn)
            self._conn = conn
            # an older file opened read-only has no items.offset: its image offsets read as 0
            self._image_offset = "offset" if _has_column(conn, "items", "offset") else "0.0"
            self._check_format()
        except sqlite3.DatabaseError as exc:
            raise ArtifactError(f"catalog {Path(self.path).name} cannot be read ({exc}); "
                                "re-ingest the collection") from None

    def _check_format(self) -> None:
        fmt = self.get_meta("format")
        if fmt is None and not self.readonly:
            with self.transaction() as conn:
                # uid: tells a catalog made afresh from an earlier one with as many commits
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('format', ?), ('seq', '0'), ('created', ?), "
                             "('uid', ?)", (str(CATALOG_FORMAT), now_iso(), uuid.uuid4().hex))
        elif fmt is None or int(fmt) != CATALOG_FORMAT:
            raise ArtifactError(f"catalog {Path(self.path).name} has format {fmt}, this version reads "
                                f"{CATALOG_FORMAT}; re-ingest the collection with --force")

    def close(self) -> None:
        with self._lock:
            if getattr(self, "_closed", False):
                return
            self._closed = True
            if not self.readonly and self.path != ":memory:":
                try:
                    # fold the WAL back into the main file so a read-only mount can open it alone
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.DatabaseError:
                    pass
            self._conn.close()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic change; bumps `seq` when it commits."""
        if self.readonly:
            raise ArtifactError("this catalog is open read-only")
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'seq'")
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('updated', ?)", (now_iso(),))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    # -- meta --------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    @property
    def seq(self) -> int:
        return int(self.get_meta("seq") or 0)

    def model(self) -> dict[str, Any] | None:
        raw = self.get_meta("model")
        return None if raw is None else json.loads(raw)

    @property
    def dim(self) -> int | None:
        raw = self.get_meta("dim")
        return None if raw is None else int(raw)

    def hubness(self) -> dict[str, Any] | None:
        """How the caption offsets were made (image → caption searches), or None."""
        raw = self.get_meta("hubness")
        return None if raw in (None, "null") else json.loads(raw)

    def hubness_images(self) -> dict[str, Any] | None:
        """How the image offsets were made (text → image searches), or None."""
        raw = self.get_meta("hubness_images")
        return None if raw in (None, "null") else json.loads(raw)

    def set_model(self, model: Mapping[str, Any], dim: int) -> None:
        with self.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('model', ?), ('dim', ?)",
                         (json.dumps(dict(model), sort_keys=True), str(int(dim))))

    def head(self) -> tuple[int, str | None, int]:
        """(seq, uid, rebuild_seq) in one read: what a reader polls to see whether anything committed."""
        with self._lock:
            rows = dict(self._conn.execute(
                "SELECT key, value FROM meta WHERE key IN ('seq', 'uid', 'rebuild_seq')").fetchall())
        return int(rows.get("seq") or 0), rows.get("uid"), int(rows.get("rebuild_seq") or 0)

    # -- reads -------------------------------------------------------------------------------
    def count(self) -> tuple[int, int]:
        with self._lock:
            n_items = self._conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            n_caps = self._conn.execute("SELECT COUNT(*) FROM captions").fetchone()[0]
        return int(n_items), int(n_caps)

    def states(self) -> dict[str, ItemState]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT image_id, path, size, mtime_ns, sha256, text_sha256, metadata FROM items").fetchall()
        return {r[0]: ItemState(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6])) for r in rows}

    def rows(self) -> CatalogRows:
        """Every item and caption with its vector, in row order (one consistent read)."""
        with self._read() as conn:
            return self._rows(conn, None)

    def changes_since(self, seq: int) -> CatalogChanges:
        """The items written and removed by commits after `seq` (one consistent read)."""
        with self._read() as conn:
            meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('uid', 'rebuild_seq')").fetchall())
            try:
                deleted = [r[0] for r in conn.execute("SELECT image_id FROM tombstones WHERE seq > ?", (seq,))]
            except sqlite3.OperationalError:  # a catalog written before the deletions log existed
                deleted = []
            rows = self._rows(conn, seq)
        return CatalogChanges(rows.seq, meta.get("uid"), int(meta.get("rebuild_seq") or 0), deleted, rows)

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    def _rows(self, conn: sqlite3.Connection, since: int | None) -> CatalogRows:
        seq = int(conn.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0])
        if self._image_offset != "offset" and _has_column(conn, "items", "offset"):
            self._image_offset = "offset"  # a writer brought the file up to date since we opened it
        off = self._image_offset
        if since is None:
            items = conn.execute(f"SELECT image_id, path, metadata, vector, seq, {off} FROM items "
                                 "ORDER BY row").fetchall()
            caps = conn.execute("SELECT caption_id, image_id, caption, vector, offset, seq FROM captions "
                                "ORDER BY row").fetchall()
        else:
            # sorted here, not by ORDER BY row: that makes SQLite walk every row instead of the seq index
            items = [r[1:] for r in sorted(conn.execute(
                f"SELECT row, image_id, path, metadata, vector, seq, {off} FROM items WHERE seq > ?", (since,)))]
            caps = [r[1:] for r in sorted(conn.execute(
                "SELECT c.row, c.caption_id, c.image_id, c.caption, c.vector, c.offset, c.seq "
                "FROM items i JOIN captions c ON c.image_id = i.image_id WHERE i.seq > ?", (since,)))]
        dim = self.dim or 0
        image_ids = [r[0] for r in items]
        row_of = {image_id: i for i, image_id in enumerate(image_ids)}
        return CatalogRows(
            image_ids=image_ids, paths=[r[1] for r in items], metadata=[json.loads(r[2]) for r in items],
            vectors=_stack([r[3] for r in items], dim),
            caption_ids=[r[0] for r in caps],
            caption_image_rows=np.array([row_of[r[1]] for r in caps], dtype=np.int64),
            caption_texts=[r[2] for r in caps], caption_vectors=_stack([r[3] for r in caps], dim),
            caption_offsets=np.array([r[4] for r in caps], dtype=np.float32), seq=seq,
            image_offsets=np.array([r[5] for r in items], dtype=np.float32),
            item_seqs=np.array([r[4] for r in items], dtype=np.int64),
            caption_seqs=np.array([r[5] for r in caps], dtype=np.int64))

    def caption_vectors(self) -> tuple[list[int], NDArray[np.float32]]:
        """(caption rows, their vectors): what the hubness offsets are computed from."""
        with self._lock:
            caps = self._conn.execute("SELECT row, vector FROM captions ORDER BY row").fetchall()
        return [r[0] for r in caps], _stack([r[1] for r in caps], self.dim or 0)

    def image_vectors(self) -> tuple[list[int], NDArray[np.float32]]:
        """(item rows, their image vectors): what the image hubness offsets are computed from."""
        with self._lock:
            items = self._conn.execute("SELECT row, vector FROM items ORDER BY row").fetchall()
        return [r[0] for r in items], _stack([r[1] for r in items], self.dim or 0)

    # -- writes ------------------------------------------------------------------------------
    def put(self, items: Iterable[NewItem]) -> int:
        """Insert or replace items (and all their captions) in one transaction; returns how many."""
        dim = self.dim
        if dim is None:
            raise ArtifactError("set the catalog's model before adding items")
        n = 0
        with self.transaction() as conn:
            seq = int(conn.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0]) + 1
            for item in items:
                vec = _vector_bytes(item.vector, dim)
                conn.execute("DELETE FROM items WHERE image_id = ?", (item.image_id,))
                conn.execute(
                    "INSERT INTO items (image_id, path, size, mtime_ns, sha256, metadata, text_sha256, vector, "
                    "offset, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (item.image_id, item.path, item.size, item.mtime_ns, item.sha256,
                     json.dumps(dict(item.metadata), sort_keys=True, ensure_ascii=False),
                     captions_sha256(item.captions), vec, _offset(item.offset, item.image_id), seq))
                self._insert_captions(conn, item, dim, seq)
                n += 1
        return n

    def update_states(self, states: Iterable[ItemState]) -> int:
        """Files that moved, were touched or have new metadata, with the same pixels: no new vectors."""
        n = 0
        with self.transaction() as conn:
            seq = int(conn.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0]) + 1
            for st in states:
                n += conn.execute(
                    "UPDATE items SET path = ?, size = ?, mtime_ns = ?, sha256 = ?, metadata = ?, seq = ? "
                    "WHERE image_id = ?",
                    (st.path, st.size, st.mtime_ns, st.sha256,
                     json.dumps(dict(st.metadata), sort_keys=True, ensure_ascii=False), seq, st.image_id)).rowcount
        return n

    def replace_captions(self, items: Iterable[NewItem]) -> int:
        """New captions (with their vectors) for existing items; the image vectors stay."""
        dim = self.dim or 0
        n = 0
        with self.transaction() as conn:
            seq = int(conn.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0]) + 1
            for item in items:
                conn.execute("DELETE FROM captions WHERE image_id = ?", (item.image_id,))
                n += conn.execute("UPDATE items SET text_sha256 = ?, seq = ? WHERE image_id = ?",
                                  (captions_sha256(item.captions), seq, item.image_id)).rowcount
                self._insert_captions(conn, item, dim, seq)
        return n

    def relink(self, links: Iterable[Relink]) -> int:
        """Moves and copies in one transaction: each new item gets its source's image vector, offset
        and captions (with their vectors) and its own path, stat and metadata; a moved source is
        removed (tombstoned, so derived indexes drop it). Returns how many were written; a link
        whose source is gone is skipped."""
        n = 0
        with self.transaction() as conn:
            seq = int(conn.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0]) + 1
            for link in links:
                st = link.state
                src = conn.execute(f"SELECT text_sha256, vector, {self._image_offset} FROM items WHERE image_id = ?",
                                   (link.source_id,)).fetchone()
                if src is None or st.image_id == link.source_id:
                    continue
                caps = conn.execute("SELECT caption, vector, offset FROM captions WHERE image_id = ? ORDER BY ord",
                                    (link.source_id,)).fetchall()
                if not link.keep_source:
                    conn.execute("INSERT OR REPLACE INTO tombstones (image_id, seq) VALUES (?, ?)",
                                 (link.source_id, seq))
                    conn.execute("DELETE FROM items WHERE image_id = ?", (link.source_id,))
                conn.execute("DELETE FROM items WHERE image_id = ?", (st.image_id,))
                conn.execute(
                    "INSERT INTO items (image_id, path, size, mtime_ns, sha256, metadata, text_sha256, vector, "
                    "offset, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (st.image_id, st.path, st.size, st.mtime_ns, st.sha256,
                     json.dumps(dict(st.metadata), sort_keys=True, ensure_ascii=False), src[0], src[1], src[2], seq))
                ids = link.caption_ids
                if link.keep_source or ids is None or len(ids) != len(caps):
                    ids = tuple(f"{st.image_id}#{i}" for i in range(len(caps)))
                conn.executemany(
                    "INSERT INTO captions (caption_id, image_id, ord, caption, vector, offset, seq) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(cid, st.image_id, i, c[0], c[1], c[2], seq) for i, (cid, c) in enumerate(zip(ids, caps))])
                n += 1
        return n

    def delete(self, image_ids: Iterable[str]) -> int:
        ids = list(image_ids)
        if not ids:
            return 0
        with self.transaction() as conn:
            seq = int(conn.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0]) + 1
            n = 0
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                marks = ",".join("?" * len(chunk))
                # the deletions log first: a reader patching its index from `changes_since` learns of it
                conn.execute(f"INSERT OR REPLACE INTO tombstones (image_id, seq) SELECT image_id, ? FROM items "
                             f"WHERE image_id IN ({marks})", [seq, *chunk])
                n += conn.execute(f"DELETE FROM items WHERE image_id IN ({marks})", chunk).rowcount
        return n

    def set_caption_offsets(self, rows: Sequence[int], offsets: NDArray[np.float32],
                            hubness: Mapping[str, Any] | None) -> None:
        with self.transaction() as conn:
            seq = int(conn.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0]) + 1
            # every caption's offset may change without its seq: derived indexes must be rebuilt
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('rebuild_seq', ?)", (str(seq),))
            conn.execute("UPDATE captions SET offset = 0")
            conn.executemany("UPDATE captions SET offset = ? WHERE row = ?",
                             [(float(o), int(r)) for r, o in zip(rows, offsets)])
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('hubness', ?)",
                         (json.dumps(dict(hubness), sort_keys=True) if hubness else "null",))

    def set_image_offsets(self, rows: Sequence[int], offsets: NDArray[np.float32],
                          hubness_images: Mapping[str, Any] | None) -> None:
        """Every image's hubness offset (rows from `image_vectors`; the rest 0) and how they were made."""
        offs = np.asarray(offsets, dtype=np.float64).reshape(-1)
        if offs.shape[0] != len(rows):
            raise ValueError(f"{offs.shape[0]} offsets for {len(rows)} image rows")
        if not np.all(np.isfinite(offs)):
            raise ValueError("image offsets must be finite")
        with self.transaction() as conn:
            seq = int(conn.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0]) + 1
            # every image's offset may change without its seq: derived indexes must be rebuilt
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('rebuild_seq', ?)", (str(seq),))
            conn.execute("UPDATE items SET offset = 0")
            conn.executemany("UPDATE items SET offset = ? WHERE row = ?",
                             [(float(o), int(r)) for r, o in zip(rows, offs)])
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('hubness_images', ?)",
                         (json.dumps(dict(hubness_images), sort_keys=True) if hubness_images else "null",))

    @staticmethod
    def _insert_captions(conn: sqlite3.Connection, item: NewItem, dim: int, seq: int) -> None:
        offs = caption_offsets_of(item)
        if not item.captions:
            return
        vecs = item.caption_vectors
        if vecs is None or len(vecs) != len(item.captions):
            raise ValueError(f"item {item.image_id}: {len(item.captions)} captions need as many vectors")
        ids = item.caption_ids or tuple(f"{item.image_id}#{i}" for i in range(len(item.captions)))
        conn.executemany(
            "INSERT INTO captions (caption_id, image_id, ord, caption, vector, offset, seq) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(cid, item.image_id, i, text, _vector_bytes(v, dim), float(o), seq)
             for i, (cid, text, v, o) in enumerate(zip(ids, item.captions, vecs, offs))])


def caption_offsets_of(item: NewItem) -> NDArray[np.float32]:
    """The item's caption offsets, one per caption (zeros when it gives none); ValueError when they
    are not as many as its captions or not finite."""
    n = len(item.captions)
    if item.caption_offsets is None:
        return np.zeros(n, np.float32)
    offs = np.asarray(item.caption_offsets, dtype=np.float32).reshape(-1)
    if offs.shape[0] != n:
        raise ValueError(f"item {item.image_id}: {n} captions need as many caption offsets, got {offs.shape[0]}")
    if not np.all(np.isfinite(offs)):
        raise ValueError(f"item {item.image_id}: caption offsets must be finite")
    return offs


def _offset(value: float, image_id: str) -> float:
    v = float(value)
    if not np.isfinite(v):
        raise ValueError(f"item {image_id}: the image offset must be finite")
    return v


def _has_column(conn: sqlite3.Connection, table: str, column: str) -> bool:
    return any(r[1] == column for r in conn.execute(f"PRAGMA table_info({table})"))


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Bring a file written by an earlier version up to the schema (columns added since, with defaults)."""
    if not _has_column(conn, "items", "offset"):
        try:
            conn.execute("ALTER TABLE items ADD COLUMN offset REAL NOT NULL DEFAULT 0")
        except sqlite3.OperationalError as exc:  # another writer opening the same file added it first
            if "duplicate column" not in str(exc):
                raise


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection. Where the folder is writable, a plain `mode=ro` one that sees what other
    processes commit later (an offline ingest into a served collection). Where it is read-only (a
    container's read-only mount) no -shm file can be made, so `immutable=1`, which reads the main file
    alone: that is only right when no -wal file holds commits, so a non-empty one is refused."""
    if _writable(path.parent):
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None)
    wal = Path(str(path) + "-wal")
    if wal.is_file() and wal.stat().st_size > 0:
        try:  # works where a -shm file is present and readable
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False,
                                   isolation_level=None)
            conn.execute("SELECT COUNT(*) FROM meta").fetchone()
            return conn
        except sqlite3.DatabaseError:
            raise ArtifactError(f"catalog {path.name} has commits in its write-ahead log ({wal.name}) that a "
                                "read-only folder cannot fold in; open the collection once where it is "
                                "writable (e.g. `python -m offline ingest` again) or mount it read-write") from None
    return sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False,
                           isolation_level=None)


def _writable(folder: Path) -> bool:
    import os

    return os.access(folder, os.W_OK)


def _vector_bytes(vector: np.ndarray, dim: int) -> bytes:
    v = np.ascontiguousarray(vector, dtype=np.float32).reshape(-1)
    if v.shape[0] != dim:
        raise ValueError(f"vector of dimension {v.shape[0]}, the catalog's model embeds to {dim}")
    if not np.all(np.isfinite(v)):
        raise ValueError("vector has NaN or infinite values")
    return v.tobytes()


def _stack(blobs: list[bytes], dim: int) -> NDArray[np.float32]:
    if not blobs:
        return np.zeros((0, dim), np.float32)
    return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), -1).copy()
