"""The small status file a folder watcher (`python -m offline watch`) keeps in its collection's folder.

`collections/<name>/watch.json`, rewritten atomically on every change and as a heartbeat while idle:
the mode (inotify / polling and why), the files waiting to settle, the last scan, the files parked
as bad (paths relative to the watched folder, never absolute ones) and counters. The service reads it
for `GET /collections` and `/metrics`; a file whose watcher stopped or whose heartbeat is old is no
status at all (`read_watch_status` returns None).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from clipsearch.manifest import write_json_atomic

STATUS_FORMAT = 1
COUNTERS = ("events", "ingested", "relinked", "removed", "skipped", "cycles", "errors")
MIN_STALE_S = 30.0  # a heartbeat older than this (or 3 beats) means the watcher is gone


def write_watch_status(path: Path, status: dict[str, Any]) -> None:
    write_json_atomic(path, {"format": STATUS_FORMAT, **status})


def read_watch_status(path: Path, now: float | None = None) -> dict[str, Any] | None:
    """The watcher's status, or None when there is none, it cannot be read, the watcher stopped, or
    its heartbeat is stale (a watcher killed without a word)."""
    try:
        status = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(status, dict) or status.get("format") != STATUS_FORMAT or status.get("state") == "stopped":
        return None
    beat = status.get("heartbeat_unix")
    every = status.get("heartbeat_every_s")
    if not isinstance(beat, (int, float)) or not isinstance(every, (int, float)):
        return None
    if (time.time() if now is None else now) - beat > max(MIN_STALE_S, 3 * every):
        return None
    return status

